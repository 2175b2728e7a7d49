"""Partition schemes behind a registry: each scheme owns its name, its options, its partition and its record.

A scheme is one ``@register_scheme`` class (as PFT strategies and general-FL algorithms are): it declares
the ``data.*`` keys it reads beyond the ones every scheme reads (``options``; the config, ``hf_lpft.run.preflight``
and the manifest derive what they check and record from them), the column it partitions by when
``data.partition_by`` is not given, and how it partitions (through a flwr-datasets partitioner,
``flwr_datasets.partitioner`` 0.6.1). Every scheme reads ``partition_by``, ``label_column``, ``test_fraction``,
``max_examples_per_client`` and ``seed``; ``hf_lpft.data.federate`` applies what they mean.

This module sits above ``hf_lpft.config`` (tests/test_layers.py): the config checks ``data.scheme`` and
``data.quantity_mode`` against the vocabularies owned here, so it imports only the base layer and third-party
code; the partitioners are imported when a partition runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hf_lpft.errors import FederationError
from hf_lpft.registry import Registry, check_entry_class

_ROW = "__hf_lpft_row__"
_KEY = "__hf_lpft_key__"
_MAX_ATTEMPTS = 10  # Dirichlet redraws (flwr-datasets' own bound)
QUANTITY_MODES = ("dirichlet", "linear", "square", "exponential")


@dataclass(frozen=True)
class PartitionArgs:
    """What a scheme's partition gets: the partition columns (as named in the view), the seed and every option
    a scheme may read (``data.*`` keys; a scheme reads those it declares)."""

    by: str | None  # partition_by as given or the scheme's default (``a+b`` joint columns allowed)
    label_column: str
    domain_column: str
    columns: dict  # original key (``a+b`` included) -> column of the view
    seed: int
    num_clients: int
    alpha: float
    min_partition_size: int
    classes_per_client: int
    quantity_mode: str
    clients_per_domain: int

    def column(self, key: str | None = None) -> str:
        """The view's column for ``key`` (default: the partition column)."""
        return self.columns[self.by if key is None else key]

    def client_ids(self) -> list[str]:
        return [f"client_{i:02d}" for i in range(self.num_clients)]


class PartitionScheme:
    """A partition scheme. Subclasses set ``name`` and ``description``, declare ``options`` (``data.*`` keys
    beyond the common ones) and implement :meth:`partition`."""

    name: ClassVar[str]
    description: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()
    partition_by_default: ClassVar[str | None] = None  # "label", "domain" or None (the scheme needs no column)
    one_client_per_value: ClassVar[bool] = False  # a client per value of partition_by (an embedded builder that
    #                                               makes one domain a client may take data.num_clients)
    records: ClassVar[tuple[str, ...] | None] = None  # keys the manifest records; None = the options in use

    def partition(self, view, args: PartitionArgs) -> list[tuple[str, np.ndarray]]:
        """(client id, source row indices) of every client; ``view`` holds the source rows in order (row i of
        ``view`` is row i of the dataset) with the partition and label columns, named by ``args.column``."""
        raise NotImplementedError

    def inapplicable(self, option: str, values: dict) -> str:
        """Why a declared ``option`` is not read with these ``values`` (e.g. another mode); "" = it is read."""
        return ""

    def used_options(self, values: dict) -> list[str]:
        return [o for o in self.options if not self.inapplicable(o, values)]

    def recorded(self, values: dict) -> dict:
        """The scheme's parameters in the manifest (after the common ones)."""
        keys = self.records if self.records is not None else self.used_options(values)
        return {k: values[k] for k in keys}

    @property
    def clients_from_values(self) -> bool:
        """Whether the client count comes from the values of the partition column (no num_clients option)."""
        return "num_clients" not in self.options


def check_scheme_class(cls: type) -> None:
    """A registrable scheme: a PartitionScheme subclass that names and describes itself, options as strings."""
    check_entry_class(cls, PartitionScheme, kind="scheme", own=("name", "description"))
    if not isinstance(cls.options, tuple) or not all(isinstance(o, str) for o in cls.options):
        raise TypeError(f"scheme {cls.name!r}: options={cls.options!r} must be a tuple of data.* key names")
    if cls.partition_by_default not in ("label", "domain", None):
        raise ValueError(f"scheme {cls.name!r}: partition_by_default={cls.partition_by_default!r} must be 'label', "
                         "'domain' or None")


SCHEMES: Registry[type[PartitionScheme]] = Registry(
    "partition scheme", check=check_scheme_class,
    unknown=lambda name, names: FederationError(f"scheme={name!r} is not allowed; choose one of {names}"))


def register_scheme(cls: type[PartitionScheme]) -> type[PartitionScheme]:
    """Class decorator: add a partition scheme to the registry under ``cls.name``."""
    return SCHEMES.register(cls)


def unregister_scheme(name: str) -> type[PartitionScheme]:
    """Remove ``name`` from the registry (e.g. a scheme a test registered); returns its class."""
    return SCHEMES.unregister(name)


def get_scheme(name: str) -> PartitionScheme:
    """The registered scheme ``name``; an unknown name is a FederationError listing the registered ones."""
    return SCHEMES.lookup(name)()


def scheme_options() -> dict[str, tuple[str, ...]]:
    """Option -> the registered schemes that read it (an option no scheme reads is not listed)."""
    out: dict[str, tuple[str, ...]] = {}
    for name, cls in SCHEMES.items():
        for option in cls.options:
            out[option] = out.get(option, ()) + (name,)
    return out


# -- flwr-datasets partitioners over a light view of the dataset ----------------------------------------------
def partition_view(ds, keys: list[str]) -> tuple[object, dict[str, str]]:
    """A light copy for the partitioners: the needed columns, joint keys (``a+b``) and the source row index."""
    view = ds.select_columns(list(dict.fromkeys(c for k in keys for c in k.split("+"))))
    view = view.add_column(_ROW, list(range(len(ds))))
    names = {}
    for k in keys:
        if "+" in k:
            parts = k.split("+")
            joint = ["|".join(map(str, vals)) for vals in zip(*(view[p] for p in parts))]
            name = f"{_KEY}{len(names)}"
            view = view.add_column(name, joint)
            names[k] = name
        else:
            names[k] = k
    return view, names


def run_partitioner(partitioner, view, what: str) -> list[np.ndarray]:
    """Row indices of every partition; a partitioner's ValueError becomes a FederationError naming ``what``."""
    partitioner.dataset = view
    try:
        with warnings.catch_warnings():  # flwr-datasets warns at every Dirichlet redraw; a failure raises below
            warnings.filterwarnings("ignore", category=UserWarning, module="flwr_datasets")
            return [np.asarray(partitioner.load_partition(i)[_ROW], dtype=np.int64)
                    for i in range(partitioner.num_partitions)]
    except ValueError as err:
        raise FederationError(f"{what}: {err}") from err


def _dirichlet(view, by: str, n: int, *, alpha: float, min_size: int, seed: int, what: str) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    part = DirichletPartitioner(num_partitions=n, partition_by=by, alpha=float(alpha), min_partition_size=min_size,
                                self_balancing=False, seed=seed)
    return run_partitioner(part, view, f"{what} (alpha={alpha}, min_partition_size={min_size}, num_clients={n}; "
                                       f"at most {_MAX_ATTEMPTS} Dirichlet draws)")


def _quantity_sizes(n_rows: int, num_clients: int, *, alpha: float, min_size: int,
                    rng: np.random.Generator) -> list[int]:
    """Client sizes ~ Dirichlet(alpha) x n_rows, each >= min_size, resampled at most _MAX_ATTEMPTS times."""
    if num_clients * min_size > n_rows:
        raise FederationError(f"quantity: num_clients={num_clients} x min_partition_size={min_size} exceeds the "
                              f"dataset's {n_rows} examples")
    for _ in range(_MAX_ATTEMPTS):
        sizes = np.floor(rng.dirichlet(np.full(num_clients, alpha)) * n_rows).astype(int)
        sizes[np.argmax(sizes)] += n_rows - sizes.sum()
        if sizes.min() >= max(min_size, 1):
            return sizes.tolist()
    raise FederationError(f"quantity: no sizes with min_partition_size={min_size} for alpha={alpha} and "
                          f"num_clients={num_clients} after {_MAX_ATTEMPTS} attempts; raise alpha or lower "
                          "min_partition_size")


def _natural_groups(view, args: PartitionArgs) -> tuple[list[str], list[np.ndarray]]:
    """One group of rows per value of the partition column, and the values as strings."""
    from flwr_datasets.partitioner import NaturalIdPartitioner

    natural = NaturalIdPartitioner(partition_by=args.column())
    groups = run_partitioner(natural, view, "natural")
    return [str(natural.partition_id_to_natural_id[i]) for i in range(len(groups))], groups


# -- the built-in schemes ---------------------------------------------------------------------------------------
@register_scheme
class Iid(PartitionScheme):
    name = "iid"
    description = "IidPartitioner over a seeded shuffle: equal sizes, the same label mix"
    options = ("num_clients",)

    def partition(self, view, args):
        from flwr_datasets.partitioner import IidPartitioner

        return list(zip(args.client_ids(), run_partitioner(IidPartitioner(args.num_clients),
                                                           view.shuffle(seed=args.seed), "iid")))


@register_scheme
class Dirichlet(PartitionScheme):
    name = "dirichlet"
    description = ("DirichletPartitioner over partition_by (default the label), concentration alpha; resampled "
                   "until every client has min_partition_size examples, at most 10 draws")
    options = ("num_clients", "alpha", "min_partition_size")
    partition_by_default = "label"

    def partition(self, view, args):
        return list(zip(args.client_ids(), _dirichlet(view, args.column(), args.num_clients, alpha=args.alpha,
                                                      min_size=args.min_partition_size, seed=args.seed,
                                                      what="dirichlet")))


@register_scheme
class Pathological(PartitionScheme):
    name = "pathological"
    description = ("PathologicalPartitioner: classes_per_client classes a client, McMahan et al.'s "
                   "first-deterministic assignment (every class used when clients >= classes)")
    options = ("num_clients", "classes_per_client")
    partition_by_default = "label"

    def partition(self, view, args):
        from flwr_datasets.partitioner import PathologicalPartitioner

        n_unique = len(set(view[args.column()]))
        if args.classes_per_client > n_unique:
            raise FederationError(f"classes_per_client={args.classes_per_client} exceeds the {n_unique} distinct "
                                  f"values of {args.by!r}")
        part = PathologicalPartitioner(num_partitions=args.num_clients, partition_by=args.column(),
                                       num_classes_per_partition=args.classes_per_client,
                                       class_assignment_mode="first-deterministic", seed=args.seed)
        return list(zip(args.client_ids(), run_partitioner(part, view, "pathological")))


@register_scheme
class Natural(PartitionScheme):
    name = "natural"
    description = "NaturalIdPartitioner: one client per value of partition_by (default the domain)"
    partition_by_default = "domain"
    one_client_per_value = True

    def partition(self, view, args):
        return list(zip(*_natural_groups(view, args)))


@register_scheme
class Quantity(PartitionScheme):
    name = "quantity"
    description = ("size skew with the label mix left iid: SizePartitioner with Dirichlet(alpha) sizes "
                   "(quantity_mode=dirichlet) or Linear/Square/ExponentialPartitioner")
    options = ("num_clients", "alpha", "min_partition_size", "quantity_mode")

    def inapplicable(self, option, values):
        if option in ("alpha", "min_partition_size") and values["quantity_mode"] != "dirichlet":
            return f" with data.quantity_mode={values['quantity_mode']!r}; it is used with quantity_mode 'dirichlet'"
        return ""

    def partition(self, view, args):
        import flwr_datasets.partitioner as P

        if args.quantity_mode == "dirichlet":
            sizes = _quantity_sizes(len(view), args.num_clients, alpha=args.alpha, min_size=args.min_partition_size,
                                    rng=np.random.default_rng(args.seed))
            part = P.SizePartitioner([int(x) for x in sizes])
        else:
            part = {"linear": P.LinearPartitioner, "square": P.SquarePartitioner,
                    "exponential": P.ExponentialPartitioner}[args.quantity_mode](args.num_clients)
        return list(zip(args.client_ids(), run_partitioner(part, view.shuffle(seed=args.seed),
                                                           f"quantity_mode={args.quantity_mode!r}")))


@register_scheme
class NaturalDirichlet(PartitionScheme):
    name = "natural+dirichlet"
    description = ("one domain (domain_column) split over clients_per_domain clients with a Dirichlet label skew "
                   "inside each domain (domain x label shift)")
    options = ("alpha", "min_partition_size", "clients_per_domain")
    partition_by_default = "domain"
    records = ("num_clients", "alpha", "min_partition_size", "domain_column", "clients_per_domain")

    def partition(self, view, args):
        out = []
        for k, (value, rows) in enumerate(zip(*_natural_groups(view, args))):
            parts = _dirichlet(view.select(rows.tolist()), args.column(args.label_column), args.clients_per_domain,
                               alpha=args.alpha, min_size=args.min_partition_size, seed=args.seed + k,
                               what=f"natural+dirichlet in {args.domain_column}={value!r}")
            out += [(f"{value}_{j}", p) for j, p in enumerate(parts)]
        return out
