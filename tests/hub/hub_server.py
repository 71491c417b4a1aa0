"""A small in-memory Hugging Face Hub for tests, driven by the real ``huggingface_hub`` client.

It implements the parts of the Hub HTTP API that ``HfApi`` uses to create a repo, create a branch, upload a
folder in one commit (preupload, LFS batch / upload / multipart / verify, NDJSON commit, pull requests) and
to look at what is already there (repo info, refs, tree, paths-info, resolve), with the response shapes
``huggingface_hub`` 2.x parses. Endpoints were found by reading ``hf_api.py``, ``_commit_api.py`` and
``lfs.py`` and checked by logging the requests the client makes (``HubServer.requests``).

Test helpers: tokens (a bad token gets 401), namespaces a user may write to (others get 403), fault
injection (``inject(route, status, times)``, ``fail_lfs_uploads_after(k)``, ``hold_lfs_uploads``) and a
record of every commit and every LFS object PUT.

Run it by hand with ``python tests/hub_server.py`` (prints the URL; token ``hf_test_token`` for user
``alice``).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REGULAR_MAX_SIZE = 10 * 1024 * 1024  # the Hub sends files of 10 MiB or more through LFS
# The patterns of the .gitattributes the Hub writes into a new model repo (subset that matters here).
DEFAULT_LFS_PATTERNS = [
    "*.7z",
    "*.arrow",
    "*.bin",
    "*.bz2",
    "*.ckpt",
    "*.ftz",
    "*.gz",
    "*.h5",
    "*.joblib",
    "*.lfs.*",
    "*.mlmodel",
    "*.model",
    "*.msgpack",
    "*.npy",
    "*.npz",
    "*.onnx",
    "*.ot",
    "*.parquet",
    "*.pb",
    "*.pickle",
    "*.pkl",
    "*.pt",
    "*.pth",
    "*.rar",
    "*.safetensors",
    "*.tar.*",
    "*.tar",
    "*.tflite",
    "*.tgz",
    "*.wasm",
    "*.xz",
    "*.zip",
    "*.zst",
    "*tfevents*",
]
KNOWN_LICENSES = {
    "apache-2.0",
    "mit",
    "cc-by-4.0",
    "cc-by-nc-4.0",
    "cc-by-sa-4.0",
    "llama2",
    "other",
    "openrail",
}
_OID = re.compile(r"^[0-9a-f]{64}$")


def git_blob_oid(data: bytes) -> str:
    """Git's object id of a blob: sha1 over ``blob <len>\\0`` + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class Blob:
    """A file in a commit tree: inline content, or a pointer to an LFS object."""

    size: int
    data: bytes | None = None  # regular file
    lfs_oid: str | None = None  # LFS file

    @property
    def git_oid(self) -> str:
        if self.lfs_oid is not None:
            return git_blob_oid(lfs_pointer(self.lfs_oid, self.size))
        return git_blob_oid(self.data or b"")

    def entry(self, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "path": path, "size": self.size, "oid": self.git_oid}
        if self.lfs_oid is not None:
            pointer_size = len(lfs_pointer(self.lfs_oid, self.size))
            out["lfs"] = {"oid": self.lfs_oid, "size": self.size, "pointerSize": pointer_size}
        return out


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    tree: dict[str, Blob]
    ref: str  # branch name or refs/pr/N
    changed: list[str] = field(default_factory=list)
    pr_num: int | None = None


@dataclass
class Repo:
    repo_id: str
    private: bool
    owner: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    prs: dict[int, str] = field(default_factory=dict)  # number -> head commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content (uploaded objects)

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if m := re.fullmatch(r"refs/pr/(\d+)", rev):
            oid = self.prs.get(int(m.group(1)))
            return self.commits[oid] if oid else None
        return self.commits.get(rev)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubState:
    """All repos and the test knobs. Guarded by one lock; handlers run in threads."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.base_url = ""
        self.tokens: dict[str, str] = {"hf_test_token": "alice"}
        self.namespaces: dict[str, set[str]] = {"alice": {"alice", "persimmon-org"}}
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, route)
        self.lfs_puts: list[str] = []  # oids whose content was received (single part or completed)
        self.faults: dict[str, list[tuple[int, bool]]] = {}
        self.fail_lfs_after: int | None = None
        self.fail_lfs_status = 507
        self.hold_lfs_uploads: threading.Event | None = None  # when set to an unset Event, PUTs wait on it
        self.lfs_upload_started = threading.Event()
        self.multipart_chunk_size: int | None = None  # objects larger than this use the multipart protocol
        self.regular_max_size = REGULAR_MAX_SIZE
        self._parts: dict[str, dict[int, bytes]] = {}
        self._counter = 0

    # ---- test helpers -------------------------------------------------------------------------------------
    def inject(self, route: str, status: int = 503, times: int = 1, *, after: bool = False) -> None:
        """Answer the next ``times`` requests of ``route`` with ``status``: instead of handling them, or
        (``after=True``) after handling them, as when a response is lost on the way back."""
        with self.lock:
            self.faults.setdefault(route, []).extend([(status, after)] * times)

    def fail_lfs_uploads_after(self, k: int | None, status: int = 507) -> None:
        """Accept ``k`` more LFS object uploads, then answer every further one with ``status``."""
        with self.lock:
            self.fail_lfs_after = None if k is None else len(self.lfs_puts) + k
            self.fail_lfs_status = status

    def count(self, route: str) -> int:
        return sum(1 for _, _, r in self.requests if r == route)

    def commits_of(self, repo_id: str) -> list[Commit]:
        """Commits in creation order (the initial commit of the repo included)."""
        return list(self.repos[repo_id].commits.values())

    def file(self, repo_id: str, path: str, rev: str = "main") -> bytes:
        repo = self.repos[repo_id]
        commit = repo.resolve(rev)
        assert commit is not None, rev
        blob = commit.tree[path]
        return repo.lfs[blob.lfs_oid] if blob.lfs_oid else (blob.data or b"")

    def create_repo_direct(self, repo_id: str, *, owner: str = "alice", private: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_id=repo_id, private=private, owner=owner)
            attrs = "".join(
                f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in DEFAULT_LFS_PATTERNS
            ).encode()
            tree = {".gitattributes": Blob(size=len(attrs), data=attrs)}
            oid = self._new_oid()
            repo.commits[oid] = Commit(oid, None, "initial commit", "", tree, "main", [".gitattributes"])
            repo.branches["main"] = oid
            self.repos[repo_id] = repo
            return repo

    # ---- internals ----------------------------------------------------------------------------------------
    def _new_oid(self) -> str:
        self._counter += 1
        return hashlib.sha1(f"commit-{self._counter}-{time.time_ns()}".encode()).hexdigest()

    def take_fault(self, route: str) -> tuple[int, bool] | None:
        with self.lock:
            pending = self.faults.get(route)
            return pending.pop(0) if pending else None


# --------------------------------------------------------------------------------------------------------------
# Request handling
# --------------------------------------------------------------------------------------------------------------

_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_ROUTES: list[tuple[str, str, re.Pattern[str]]] = [
    (m, name, re.compile(rx))
    for m, name, rx in [
        ("GET", "whoami", r"^/api/whoami-v2$"),
        ("GET", "agent_harnesses", r"^/api/agent-harnesses$"),  # best-effort client telemetry registry
        ("POST", "create_repo", r"^/api/repos/create$"),
        ("POST", "validate_yaml", r"^/api/validate-yaml$"),
        (
            "GET",
            "repo_info",
            rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}(?:/revision/(?P<rev>[^/]+))?$",
        ),
        ("GET", "refs", rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}/refs$"),
        ("POST", "branch", rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}/branch/(?P<branch>[^/]+)$"),
        ("POST", "preupload", rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}/preupload/(?P<rev>[^/]+)$"),
        ("POST", "commit", rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}/commit/(?P<rev>[^/]+)$"),
        ("POST", "paths_info", rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}/paths-info/(?P<rev>[^/]+)$"),
        (
            "GET",
            "tree",
            rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$",
        ),
        ("POST", "lfs_batch", rf"^/(?P<prefix>datasets/|spaces/)?{_REPO}\.git/info/lfs/objects/batch$"),
        ("PUT", "lfs_upload", rf"^/_lfs/{_REPO}/upload/(?P<oid>[0-9a-f]{{64}})$"),
        ("PUT", "lfs_part", rf"^/_lfs/{_REPO}/part/(?P<oid>[0-9a-f]{{64}})/(?P<part>\d+)$"),
        ("POST", "lfs_complete", rf"^/_lfs/{_REPO}/upload/(?P<oid>[0-9a-f]{{64}})$"),
        ("POST", "lfs_verify", rf"^/_lfs/{_REPO}/verify$"),
        ("GET", "resolve", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"),
        ("HEAD", "resolve", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"),
    ]
]
# LFS upload/part/complete URLs are pre-signed on the real Hub: the client sends no Authorization header.
_WRITE_ROUTES = {"create_repo", "branch", "preupload", "commit", "lfs_batch", "lfs_verify"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small keep-alive responses would otherwise wait for delayed ACKs
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ---- plumbing -----------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        ctype = "application/octet-stream" if isinstance(body, bytes) else "application/json"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        route, match = "unknown", None
        for m, name, rx in _ROUTES:
            if m == method and (match := rx.match(split.path)):
                route = name
                break
        body = self._read_body()
        with state.lock:
            state.requests.append((method, split.path, route))
        if match is None:
            self._send(404, {"error": f"no route for {method} {split.path}"})
            return
        fault = state.take_fault(route)
        if fault is not None and not fault[1]:
            self._send(fault[0], {"error": f"injected {fault[0]}"})
            return
        params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        try:
            user = self._authenticate(route)
            result = getattr(self, f"_r_{route}")(params, body, user)
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, {"error": err.message}, headers)
            return
        status, payload, headers = result if isinstance(result, tuple) else (200, result, None)
        if fault is not None:  # handled, but the answer is "lost"
            status, payload, headers = fault[0], {"error": f"injected {fault[0]} after handling"}, None
        self._send(status, payload, headers)

    def _authenticate(self, route: str) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            if route in _WRITE_ROUTES or route == "whoami":
                raise HubError(401, "You must be authenticated to access this resource.")
            return None
        user = self.server.state.tokens.get(auth[len("Bearer ") :])
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, params: dict[str, str], user: str | None, *, write: bool = False) -> Repo:
        if params.get("type", "models") != "models" or params.get("prefix"):
            raise HubError(404, "Repository not found (this server only has model repos)", "RepoNotFound")
        repo_id = f"{params['ns']}/{params['name']}"
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and params["ns"] not in self.server.state.namespaces.get(user or "", set()):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _json(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except ValueError as err:
            raise HubError(400, f"invalid JSON body: {err}") from err

    # ---- routes -------------------------------------------------------------------------------------------
    def _r_whoami(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        orgs = sorted(self.server.state.namespaces.get(user or "", set()) - {user})
        return {
            "type": "user",
            "name": user,
            "orgs": [{"name": o} for o in orgs],
            "auth": {"type": "access_token"},
        }

    def _r_agent_harnesses(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        return {"standardEnvVars": [], "harnesses": {}}

    def _r_create_repo(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        payload = self._json(body)
        state = self.server.state
        if payload.get("type", "model") != "model":
            raise HubError(400, "this server only creates model repos")
        name, ns = payload.get("name"), payload.get("organization") or user
        if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise HubError(400, f"invalid repo name {name!r}")
        if ns not in state.namespaces.get(user or "", set()):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {ns!r}")
        repo_id = f"{ns}/{name}"
        url = f"{state.base_url}/{repo_id}"
        with state.lock:
            if repo_id in state.repos:
                return 409, {"error": "You already created this model repo", "url": url}, None
            private = (
                payload.get("visibility", "private" if payload.get("private") else "public") == "private"
            )
            state.create_repo_direct(repo_id, owner=user or ns, private=private)
        return {"url": url, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]}

    def _r_validate_yaml(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        content = self._json(body).get("content", "")
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if not m:
            return {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            meta = yaml.safe_load(m.group(1)) or {}
        except yaml.YAMLError as err:
            return 400, {"error": "invalid yaml", "errors": [{"message": str(err)}]}, None
        if not isinstance(meta, dict):
            return 400, {"error": "invalid yaml", "errors": [{"message": "metadata must be a mapping"}]}, None
        lic = meta.get("license")
        if lic is not None and lic not in KNOWN_LICENSES:
            return (
                400,
                {"error": "invalid metadata", "errors": [{"message": f'"license" {lic!r} is invalid'}]},
                None,
            )
        return {"errors": [], "warnings": []}

    def _r_repo_info(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        repo = self._repo(params, user)
        commit = self._commit_at(repo, params.get("rev", "main"))
        return {
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(commit.tree)],
        }

    def _r_refs(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        repo = self._repo(params, user)
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()
        ]
        return {"branches": branches, "tags": [], "converts": []}

    def _r_branch(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        repo = self._repo(params, user, write=True)
        start = self._json(body).get("startingPoint") or "main"
        with self.server.state.lock:
            if params["branch"] in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{params['branch']}")
            repo.branches[params["branch"]] = self._commit_at(repo, start).oid
        return {}

    def _upload_mode(self, repo: Repo, commit: Commit, path: str, size: int, sample: bytes) -> str:
        attrs = commit.tree.get(".gitattributes")
        patterns = [
            line.split()[0]
            for line in (attrs.data or b"").decode().splitlines()
            if attrs is not None and "filter=lfs" in line
        ]
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns):
            return "lfs"
        if size >= self.server.state.regular_max_size or b"\x00" in sample:
            return "lfs"
        return "regular"

    def _r_preupload(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        repo = self._repo(params, user, write=True)
        commit = self._commit_at(repo, params["rev"])
        files = []
        for f in self._json(body).get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            mode = self._upload_mode(repo, commit, f["path"], int(f["size"]), sample)
            remote = commit.tree.get(f["path"])
            oid = None
            if remote is not None:  # the Hub answers the sha256 for LFS files and the git oid for others
                oid = remote.lfs_oid if (mode == "lfs" and remote.lfs_oid) else remote.git_oid
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": files, "commitOid": commit.oid}

    def _r_lfs_batch(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        repo = self._repo(params, user, write=True)
        payload = self._json(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "only the upload operation is supported")
        base = f"{self.server.state.base_url}/_lfs/{repo.repo_id}"
        chunk = self.server.state.multipart_chunk_size
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid", ""), obj.get("size")
            if not _OID.match(oid) or not isinstance(size, int):
                objects.append(
                    {"oid": str(oid), "size": int(size or 0), "error": {"code": 422, "message": "bad oid"}}
                )
                continue
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs:  # objects already stored get no actions: the client skips them
                header: dict[str, str] = {}
                if chunk is not None and size > chunk:
                    n_parts = -(-size // chunk)
                    header = {"chunk_size": str(chunk)}
                    header.update({str(i): f"{base}/part/{oid}/{i}" for i in range(1, n_parts + 1)})
                entry["actions"] = {
                    "upload": {"href": f"{base}/upload/{oid}", "header": header},
                    "verify": {"href": f"{base}/verify", "header": {}},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def _lfs_gate(self) -> None:
        state = self.server.state
        state.lfs_upload_started.set()
        if state.hold_lfs_uploads is not None:
            state.hold_lfs_uploads.wait(timeout=60)
        with state.lock:
            if state.fail_lfs_after is not None and len(state.lfs_puts) >= state.fail_lfs_after:
                raise HubError(state.fail_lfs_status, "LFS storage unavailable (injected)")

    def _signed_repo(self, params: dict[str, str]) -> Repo:
        repo = self.server.state.repos.get(f"{params['ns']}/{params['name']}")
        if repo is None:
            raise HubError(404, "no such upload URL")
        return repo

    def _store(self, repo: Repo, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"content does not match oid {oid}")
        with self.server.state.lock:
            repo.lfs[oid] = data
            self.server.state.lfs_puts.append(oid)

    def _r_lfs_upload(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        self._lfs_gate()
        self._store(self._signed_repo(params), params["oid"], body)
        return {}

    def _r_lfs_part(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        self._lfs_gate()
        with self.server.state.lock:
            self.server.state._parts.setdefault(params["oid"], {})[int(params["part"])] = body
        return 200, {}, {"ETag": hashlib.md5(body).hexdigest()}

    def _r_lfs_complete(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        payload = self._json(body)
        parts = self.server.state._parts.pop(params["oid"], {})
        numbers = [p["partNumber"] for p in payload.get("parts", [])]
        if payload.get("oid") != params["oid"] or sorted(numbers) != sorted(parts):
            raise HubError(400, "multipart completion does not match the uploaded parts")
        for p in payload["parts"]:
            if p["etag"] != hashlib.md5(parts[p["partNumber"]]).hexdigest():
                raise HubError(400, f"bad etag for part {p['partNumber']}")
        data = b"".join(parts[n] for n in sorted(parts))
        self._store(self._signed_repo(params), params["oid"], data)
        return {}

    def _r_lfs_verify(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        repo = self._repo(params, user, write=True)
        payload = self._json(body)
        data = repo.lfs.get(payload.get("oid", ""))
        if data is None or len(data) != payload.get("size"):
            raise HubError(404, "object not found or wrong size")
        return {}

    def _r_commit(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        state = self.server.state
        repo = self._repo(params, user, write=True)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first NDJSON line must be the header")
        header = lines[0]["value"]
        with state.lock:
            base = self._commit_at(repo, params["rev"])
            if header.get("parentCommit") and header["parentCommit"] != base.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree, changed = dict(base.tree), []
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    data = base64.b64decode(value["content"])
                    tree[path] = Blob(size=len(data), data=data)
                elif key == "lfsFile":
                    oid = value.get("oid", "")
                    if oid not in repo.lfs:
                        raise HubError(422, f"LFS object {oid} for {path} was not uploaded")
                    tree[path] = Blob(size=len(repo.lfs[oid]), lfs_oid=oid)
                elif key == "deletedFile":
                    tree.pop(path, None)
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
                changed.append(path)
            oid = state._new_oid()
            pr_num = None
            if self.query.get("create_pr") == "1":
                pr_num = max(repo.prs, default=0) + 1
                ref = f"refs/pr/{pr_num}"
            else:
                ref = params["rev"]
            commit = Commit(
                oid, base.oid, header.get("summary", ""), header.get("description", ""), tree, ref
            )
            commit.changed, commit.pr_num = changed, pr_num
            repo.commits[oid] = commit
            if pr_num is not None:
                repo.prs[pr_num] = oid
            elif params["rev"] in repo.branches:
                repo.branches[params["rev"]] = oid
            elif m := re.fullmatch(r"refs/pr/(\d+)", params["rev"]):
                repo.prs[int(m.group(1))] = oid
            else:
                raise HubError(400, f"cannot commit on {params['rev']!r}: not a branch")
        result: dict[str, Any] = {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{state.base_url}/{repo.repo_id}/commit/{oid}",
            "hookOutput": "",
        }
        if pr_num is not None:
            result["pullRequestUrl"] = f"{state.base_url}/{repo.repo_id}/discussions/{pr_num}"
        return result

    def _entries(self, commit: Commit, paths: list[str]) -> list[dict[str, Any]]:
        out = []
        for path in paths:
            path = path.strip("/")
            if path in commit.tree:
                out.append(commit.tree[path].entry(path))
            elif any(p.startswith(path + "/") for p in commit.tree):
                out.append(
                    {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}
                )
        return out

    def _r_paths_info(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        repo = self._repo(params, user)
        commit = self._commit_at(repo, params["rev"])
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = self._json(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        return self._entries(commit, [paths] if isinstance(paths, str) else list(paths))

    def _r_tree(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        repo = self._repo(params, user)
        commit = self._commit_at(repo, params["rev"])
        prefix = params.get("path", "").strip("/")
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        if prefix and prefix in commit.tree:
            raise HubError(400, f"{prefix} is a file, not a directory")
        under = [p for p in sorted(commit.tree) if not prefix or p.startswith(prefix + "/")]
        if prefix and not under:
            raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
        listed: list[str] = []
        for p in under:
            rest = p[len(prefix) + 1 :] if prefix else p
            if recursive or "/" not in rest:
                listed.append(p)
            else:
                folder = (prefix + "/" if prefix else "") + rest.split("/")[0]
                if folder not in listed:
                    listed.append(folder)
        if recursive:
            folders = {"/".join(p.split("/")[:i]) for p in listed for i in range(1, p.count("/") + 1)}
            listed += sorted(f for f in folders if not prefix or f.startswith(prefix + "/"))
        return self._entries(commit, listed)

    def _r_resolve(self, params: dict[str, str], body: bytes, user: str | None) -> Any:
        repo = self._repo(params, user)
        commit = self._commit_at(repo, params["rev"])
        blob = commit.tree.get(params["path"])
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        data = repo.lfs[blob.lfs_oid] if blob.lfs_oid else (blob.data or b"")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.lfs_oid or blob.git_oid}"'}
        return 200, data, headers


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


class HubServer:
    """The server on 127.0.0.1 (port chosen by the OS), run in a background thread.

    Example::

        with HubServer() as hub:
            api = HfApi(endpoint=hub.url, token="hf_test_token")
    """

    def __init__(self) -> None:
        self.state = HubState()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.state = self.state
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.state.base_url = self.url
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )

    def __getattr__(self, name: str) -> Any:  # hub.inject(...), hub.repos, ... delegate to the state
        return getattr(self.__dict__["state"], name)

    def __setattr__(self, name: str, value: Any) -> None:  # hub.multipart_chunk_size = ... sets the state
        if "state" in self.__dict__ and hasattr(self.state, name):
            setattr(self.state, name, value)
        else:
            super().__setattr__(name, value)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.state.hold_lfs_uploads is not None:
            self.state.hold_lfs_uploads.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - manual use
    with HubServer() as hub:
        print(f"Hub at {hub.url} (token hf_test_token, user alice); Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
