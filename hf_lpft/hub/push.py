"""Publish a run: the model repo in ONE commit, the results dataset with ``Dataset.push_to_hub``.

Endpoint: ``HF_ENDPOINT`` (see :func:`hf_lpft.hub.export.hub_endpoint`). Token: the ``token`` argument, else
``HF_TOKEN`` or the login cache, resolved by huggingface_hub itself; it is never written to a file, a card
or a log (nothing here formats it). Transient failures (HTTP 429/5xx, connection errors) are retried with
exponential backoff. A commit is atomic on the server, so a failure leaves the repo at its previous commit:
the model repo is either fully updated or untouched. The dataset repo gets one commit per config
(``datasets`` makes one per ``push_to_hub``) and one for its card; the error names what was published.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import httpx
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard, HfApi
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

from hf_lpft.hub import HubPushError
from hf_lpft.hub.cards import RunInfo, results_card
from hf_lpft.hub.export import (
    CLIENTS_SPLIT,
    SUMMARY_SPLIT,
    default_results_repo,
    export_run,
    hub_endpoint,
    results_datasets,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

RETRIES = 4  # attempts per request
BACKOFF_SECONDS = 2.0  # first wait; doubles each retry


@dataclass
class PushResult:
    model_commit_url: str
    results_repo_id: str
    results_commit_urls: list[str] = field(default_factory=list)


def is_transient(err: BaseException) -> bool:
    """Worth retrying: rate limiting, server errors, dropped connections and timeouts."""
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        return err.response.status_code == 429 or err.response.status_code >= 500
    return isinstance(err, (httpx.TransportError, ConnectionError, TimeoutError))


def with_retry(fn: Callable[[], T], *, what: str, attempts: int | None = None, backoff: float | None = None) -> T:
    """Call ``fn``; retry transient errors with exponential backoff, re-raise anything else at once."""
    attempts, delay = attempts or RETRIES, BACKOFF_SECONDS if backoff is None else backoff
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified just below
            if not is_transient(err) or attempt == attempts:
                raise
            status = getattr(getattr(err, "response", None), "status_code", type(err).__name__)
            logger.warning("%s: transient error (%s), retry %d/%d in %.1f s", what, status, attempt, attempts - 1,
                           delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _check_endpoints(endpoint: str) -> None:
    """``datasets`` read HF_ENDPOINT at its import; refuse to send the model and the results to different hubs."""
    import datasets

    if datasets.config.HF_ENDPOINT.rstrip("/") != endpoint:
        raise HubPushError(f"HF_ENDPOINT is {endpoint!r} but `datasets` was imported with "
                           f"{datasets.config.HF_ENDPOINT!r}; "
                           "set HF_ENDPOINT before starting Python")


def _remote_files(api: HfApi, repo_id: str, repo_type: str) -> set[str]:
    try:
        return set(api.list_repo_files(repo_id, repo_type=repo_type))
    except (RepositoryNotFoundError, EntryNotFoundError):
        return set()


def model_operations(folder: Path, remote: set[str]) -> list:
    """Add every file of the Hub-ready folder, delete remote files it no longer has (the repo mirrors the run)."""
    local = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    adds = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in local.items()]
    stale = sorted(remote - set(local) - {".gitattributes"})
    return adds + [CommitOperationDelete(path_in_repo=rel) for rel in stale]


def push_model(api: HfApi, folder: Path, repo_id: str, *, private: bool, message: str) -> str:
    """Create the repo if needed and upload the folder in one atomic commit; returns the commit URL."""
    with_retry(lambda: api.create_repo(repo_id, private=private, exist_ok=True), what=f"create {repo_id}")
    remote = with_retry(lambda: _remote_files(api, repo_id, "model"), what=f"list {repo_id}")
    # Operations are rebuilt on each attempt: huggingface_hub refuses to reuse committed ones.
    info = with_retry(lambda: api.create_commit(repo_id, model_operations(folder, remote), commit_message=message),
                      what=f"commit to {repo_id}")
    return info.commit_url


def push_results(api: HfApi, info: RunInfo, repo_id: str, *, model_repo_id: str, private: bool, token: str | None,
                 endpoint: str) -> list[str]:
    """One ``push_to_hub`` per config (per-client rows, summary), then the dataset card (metadata merged)."""
    with_retry(lambda: api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True),
               what=f"create {repo_id}")
    urls = []
    for (config, ds), split in zip(results_datasets(info).items(), (CLIENTS_SPLIT, SUMMARY_SPLIT)):
        commit = with_retry(lambda: ds.push_to_hub(repo_id, config_name=config, split=split, private=private,
                                                   token=token,
                                                   commit_message=f"Upload results config {config}"),
                            what=f"push {config} to {repo_id}")
        urls.append(commit.commit_url)
    readme = with_retry(lambda: api.hf_hub_download(repo_id, "README.md", repo_type="dataset"), what="read card")
    metadata = DatasetCard.load(readme).data.to_dict()
    card = results_card(info, repo_id=repo_id, model_repo_id=model_repo_id, endpoint=endpoint, metadata=metadata)
    commit = with_retry(lambda: api.create_commit(repo_id, [CommitOperationAdd("README.md", str(card).encode())],
                                                  repo_type="dataset", commit_message="Update dataset card"),
                        what=f"card of {repo_id}")
    return urls + [commit.commit_url]


def push_run(output_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None, *,
             results_repo_id: str | None = None, experiment: str | None = None) -> PushResult:
    """Export the run's Hub-ready folders and publish them.

    Args:
        output_dir: A finished run folder.
        repo_id: The model repo (``user/name``); created if missing.
        private: Create the repos private.
        token: Hub token; default ``HF_TOKEN`` or the login cache. Never written or logged.
        results_repo_id: The results dataset repo; default ``<repo_id>-results``.
        experiment: The dataset config name; default the output folder's name.

    Raises:
        HubPushError: naming the failed step and what is already published.
    """
    endpoint = hub_endpoint()
    _check_endpoints(endpoint)
    results_repo_id = results_repo_id or default_results_repo(repo_id)
    folders = export_run(output_dir, repo_id=repo_id, results_repo_id=results_repo_id, experiment=experiment,
                         endpoint=endpoint)
    info = RunInfo.read(output_dir, folders.experiment)
    api = HfApi(endpoint=endpoint, token=token)
    retry = f"hf-lpft push {output_dir} --hub_repo_id {repo_id} --hub_results_repo_id {results_repo_id} " \
            f"--hub_experiment {folders.experiment}" + (" --hub_private" if private else "")
    try:
        url = push_model(api, folders.model, repo_id, private=private,
                         message=f"hf_lpft: publish experiment {folders.experiment}")
    except Exception as err:
        raise HubPushError(f"publishing the model repo {repo_id!r} to {endpoint} failed ({_describe(err)}); nothing "
                           "was "
                           "published (a commit is atomic: the repo is at its previous commit). Retry with: "
                           f"{retry}") from err
    logger.info("model repo published: %s", url)
    try:
        urls = push_results(api, info, results_repo_id, model_repo_id=repo_id, private=private, token=token,
                            endpoint=endpoint)
    except Exception as err:
        raise HubPushError(f"the model repo {repo_id!r} was published ({url}) but the results dataset "
                           f"{results_repo_id!r} failed ({_describe(err)}); its configs are each complete or absent. "
                           f"Finish with: {retry}") from err
    logger.info("results dataset published: %s (config %s)", results_repo_id, folders.experiment)
    return PushResult(url, results_repo_id, urls)


def _describe(err: BaseException) -> str:
    """A one-line cause: HTTP status and the server's message (no request headers, hence no token)."""
    response = getattr(err, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} from {response.request.method} {response.request.url.path}: " \
               f"{response.headers.get('X-Error-Message') or response.reason_phrase}"
    return f"{type(err).__name__}: {err}"


class HubSection(Protocol):
    """What :func:`publish_run` reads: the config's ``hub`` section (``hf_lpft.config.HubConfig``)."""

    push_to_hub: bool
    hub_repo_id: str | None
    hub_private: bool
    hub_results_repo_id: str | None
    hub_experiment: str | None


def publish_run(h: HubSection, output_dir: str | Path) -> PushResult | None:
    """The end of a run: always write the Hub-ready folders; push them when ``h.push_to_hub``.

    Args:
        h: The run's Hub settings (``cfg.hub``, a ``HubConfig``).
        output_dir: The run's output folder.
    """
    if h.push_to_hub:
        return push_run(output_dir, h.hub_repo_id, h.hub_private, results_repo_id=h.hub_results_repo_id,
                        experiment=h.hub_experiment)
    export_run(output_dir, repo_id=h.hub_repo_id, results_repo_id=h.hub_results_repo_id, experiment=h.hub_experiment)
    return None
