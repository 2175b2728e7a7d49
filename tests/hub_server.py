"""A small Hub-compatible HTTP server for offline tests (models and datasets, in memory).

It implements the endpoints ``huggingface_hub`` (1.x, httpx), ``datasets`` (``push_to_hub``,
``load_dataset`` through ``HfFileSystem``) and ``peft`` call: repo creation, YAML validation, preupload
(binary weights and data files go through the basic LFS protocol: batch, PUT, verify; other files travel
base64-encoded in the NDJSON commit), commit (atomic: all operations or none), repo info with siblings, tree listing, paths-info and ``resolve`` downloads with the
headers ``hf_hub_download`` needs (``X-Repo-Commit``, ``ETag``, ``Content-Length``, ranges).

Fault injection: ``server.fail_next_commits = n`` makes the next ``n`` commit requests answer 500 without
touching the repo. Every ``Authorization`` header seen is kept in ``server.auth_headers``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_oid(data: bytes) -> str:
    """The git blob sha1 (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    lfs: frozenset[str] = frozenset()  # paths stored as LFS objects


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    commits: list[Commit] = field(default_factory=list)

    def at(self, rev: str) -> Commit | None:
        """The commit a revision names (``main`` = the latest), None if unknown."""
        if rev in ("main", "HEAD"):
            return self.commits[-1]
        return next((c for c in self.commits if c.oid == rev), None)


class FakeHub:
    """In-memory repos + a threaded HTTP server; ``endpoint`` is its base URL."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.fail_next_commits = 0
        self.fail_all: int | None = None  # answer every request with this HTTP status (e.g. 500)
        self.tokens: set[str] | None = None  # when set, a request without one of these tokens gets HTTP 401
        self.auth_headers: list[str] = []
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def create(self, repo_type: str, repo_id: str, private: bool) -> bool:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return False
            repo = Repo(repo_type, repo_id, private)
            gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            repo.commits.append(Commit(hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest(), "initial commit",
                                       {".gitattributes": gitattributes}))
            self.repos[(repo_type, repo_id)] = repo
            return True

    def commit(self, repo: Repo, lines: list[dict]) -> Commit:
        """Apply an NDJSON commit atomically (all operations on a copy, then one append)."""
        with self.lock:
            header = lines[0]["value"]
            parent = repo.commits[-1]
            if header.get("parentCommit") and header["parentCommit"] != parent.oid:
                raise _HTTPError(412, "A commit has happened since. Please refresh and try again.")
            files, lfs = dict(parent.files), set(parent.lfs)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                    lfs.discard(value["path"])
                elif key == "lfsFile":
                    if value["oid"] not in self.lfs_objects:
                        raise _HTTPError(400, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = self.lfs_objects[value["oid"]]
                    lfs.add(value["path"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise _HTTPError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(prefix)}
                else:
                    raise _HTTPError(400, f"unsupported commit operation {key!r}")
            oid = hashlib.sha1(f"{parent.oid}{time.time_ns()}{sorted(files)}".encode()).hexdigest()
            commit = Commit(oid, header.get("summary", ""), files, frozenset(lfs & set(files)))
            repo.commits.append(commit)
            return commit


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


API = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(revision|preupload|commit|tree|paths-info|auth-check)"
                 r"(?:/([^/]+))?(?:/(.*))?)?$")
LFS_BATCH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
LFS_SUFFIXES = (".safetensors", ".parquet", ".arrow", ".bin", ".pt", ".pth")
RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        # -- plumbing ---------------------------------------------------------------------------------
        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head and self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _dispatch(self, method: str) -> None:
            auth = self.headers.get("Authorization")
            if auth:
                hub.auth_headers.append(auth)
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            try:
                body = self._body() if method in ("POST", "PUT") else b""
                if hub.fail_all is not None:
                    raise _HTTPError(hub.fail_all,
                                     "Internal Error - We're working hard to fix this as soon as possible!")
                if hub.tokens is not None and (auth or "").removeprefix("Bearer ") not in hub.tokens:
                    raise _HTTPError(401, "Invalid credentials in Authorization header")
                self._route(method, path, query, body)
            except _HTTPError as err:
                headers = {"X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self._json(err.status, {"error": err.message, **err.extra}, headers)

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        # -- routes -----------------------------------------------------------------------------------
        def _repo(self, kind: str, repo_id: str) -> Repo:
            repo = hub.repos.get((kind.rstrip("s"), repo_id))
            if repo is None:
                raise _HTTPError(404, "Repository not found", "RepoNotFound")
            return repo

        def _commit_at(self, repo: Repo, rev: str | None) -> Commit:
            commit = repo.at(rev or "main")
            if commit is None:
                raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return commit

        def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
            if path == "/api/repos/create" and method == "POST":
                return self._create(json.loads(body))
            if path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            if path == "/api/whoami-v2":
                return self._json(200, {"name": "tester", "type": "user", "orgs": [], "auth": {}})
            if path.startswith("/lfs-upload/") and method == "PUT":
                return self._lfs_put(path.rsplit("/", 1)[1], body)
            if path.startswith("/lfs-verify/"):
                return self._json(200, {})
            m = LFS_BATCH.match(path)
            if m:
                return self._lfs_batch(json.loads(body))
            m = API.match(path)
            if m:
                kind, repo_id, action, rev, rest = m.groups()
                repo = self._repo(kind, repo_id)
                if action in (None, "revision"):
                    return self._info(repo, self._commit_at(repo, rev))
                if action == "preupload":
                    return self._preupload(repo, json.loads(body))
                if action == "commit" and method == "POST":
                    return self._commit(repo, body)
                if action == "tree":
                    return self._tree(repo, self._commit_at(repo, rev), rest or "", query)
                if action == "auth-check":  # the repo exists and (no per-repo permissions here) is writable
                    return self._json(200, {})
                if action == "paths-info":
                    return self._paths_info(repo, self._commit_at(repo, rev), body)
            m = RESOLVE.match(path)
            if m:
                kind, repo_id, rev, filename = m.groups()
                repo = self._repo(kind or "models", repo_id)
                return self._resolve(repo, self._commit_at(repo, rev), filename, head=method == "HEAD")
            raise _HTTPError(404, f"no route for {method} {path}")

        def _create(self, payload: dict) -> None:
            name, org = payload["name"], payload.get("organization")
            repo_id = f"{org}/{name}" if org else name if "/" in name else f"tester/{name}"
            repo_type = payload.get("type") or "model"
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{hub.endpoint}/{prefix}{repo_id}"
            private = bool(payload.get("private")) or payload.get("visibility") == "private"
            if not hub.create(repo_type, repo_id, private):
                raise _HTTPError(409, "You already created this model repo", extra={"url": url})
            self._json(200, {"url": url, "name": repo_id})

        def _info(self, repo: Repo, commit: Commit) -> None:
            siblings = [{"rfilename": p, "size": len(b)} for p, b in sorted(commit.files.items())]
            self._json(200, {"id": repo.repo_id, "_id": repo.repo_id, "sha": commit.oid, "private": repo.private,
                             "siblings": siblings, "lastModified": "2024-01-01T00:00:00.000Z", "tags": [],
                             "downloads": 0, "likes": 0, "disabled": False, "gated": False})

        def _preupload(self, repo: Repo, payload: dict) -> None:
            head = repo.commits[-1]
            out = []
            for f in payload["files"]:
                lfs = f["path"].endswith(LFS_SUFFIXES)
                data = head.files.get(f["path"])
                oid = None if data is None else hashlib.sha256(data).hexdigest() if lfs else git_oid(data)
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
            self._json(200, {"files": out})

        def _lfs_batch(self, payload: dict) -> None:
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs_objects:
                    entry["actions"] = {"upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}"},
                                        "verify": {"href": f"{hub.endpoint}/lfs-verify/{obj['oid']}"}}
                objects.append(entry)
            self._json(200, {"transfer": "basic", "objects": objects})

        def _lfs_put(self, oid: str, body: bytes) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                raise _HTTPError(400, "LFS upload does not match its oid")
            hub.lfs_objects[oid] = body
            self._send(200)

        def _commit(self, repo: Repo, body: bytes) -> None:
            with hub.lock:
                if hub.fail_next_commits > 0:
                    hub.fail_next_commits -= 1
                    raise _HTTPError(500, "Internal Error - We're working hard to fix this as soon as possible!")
            commit = hub.commit(repo, [json.loads(line) for line in body.splitlines() if line.strip()])
            prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
            self._json(200, {"commitUrl": f"{hub.endpoint}/{prefix}{repo.repo_id}/commit/{commit.oid}",
                             "commitOid": commit.oid, "pullRequestUrl": None, "success": True})

        @staticmethod
        def _entry(commit: Commit, path: str) -> dict | None:
            files = commit.files
            if path in files:
                entry = {"type": "file", "path": path, "oid": git_oid(files[path]), "size": len(files[path])}
                if path in commit.lfs:
                    entry["lfs"] = {"oid": hashlib.sha256(files[path]).hexdigest(), "size": len(files[path]),
                                    "pointerSize": 134}
                return entry
            prefix = path.rstrip("/") + "/" if path else ""
            if any(p.startswith(prefix) for p in files):
                return {"type": "directory", "path": path, "oid": hashlib.sha1(prefix.encode()).hexdigest(), "size": 0}
            return None

        def _tree(self, repo: Repo, commit: Commit, folder: str, query: dict) -> None:
            folder = folder.strip("/")
            if folder and self._entry(commit, folder) is None:
                raise _HTTPError(404, f"{folder} does not exist", "EntryNotFound")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            prefix = folder + "/" if folder else ""
            names: set[str] = set()
            for p in commit.files:
                if not p.startswith(prefix):
                    continue
                parts = p[len(prefix):].split("/")
                depth = len(parts) if recursive else 1
                for i in range(1, min(depth, len(parts)) + 1):
                    names.add(prefix + "/".join(parts[:i]))
            self._json(200, [self._entry(commit, n) for n in sorted(names)])

        def _paths_info(self, repo: Repo, commit: Commit, body: bytes) -> None:
            ctype = self.headers.get("Content-Type", "")
            paths = json.loads(body).get("paths", []) if "json" in ctype else parse_qs(body.decode()).get("paths", [])
            entries = [self._entry(commit, p.strip("/")) for p in paths]
            self._json(200, [e for e in entries if e is not None])

        def _resolve(self, repo: Repo, commit: Commit, filename: str, *, head: bool) -> None:
            if filename not in commit.files:
                raise _HTTPError(404, "Entry not found", "EntryNotFound")
            data = commit.files[filename]
            etag = hashlib.sha256(data).hexdigest() if filename in commit.lfs else git_oid(data)
            headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            rng = self.headers.get("Range")
            m = re.match(r"bytes=(\d*)-(\d*)", rng or "")
            if m and data:
                start = int(m.group(1) or 0)
                end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start:end + 1], headers, head=head)
            self._send(200, data, headers, head=head)

    return Handler
