"""Token resolution and preflight, against a local HTTP server that answers like the Hugging Face Hub."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from lmsys_utils.auth import AccessError, find_token, preflight, resolve_token

GOOD = "hf_goodTokenForTestsOnly123"
NO_ACCESS = "hf_validButNotApprovedToken456"
SECRET_OF_KAGGLE = "hf_fromTheKaggleSecret789"
PUBLIC, GATED, PRIVATE = "openai-community/gpt2", "meta-llama/Meta-Llama-3-8B-Instruct", "someone/private-model"


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers like the hub: auth-check and file downloads, with its status codes and X-Error-* headers.

    GATED serves the files of `server.files_dir` (the tiny model) to the approved token only.
    """

    def do_GET(self):
        self._route(send_body=True)

    def do_HEAD(self):
        self._route(send_body=False)

    def _route(self, send_body):
        path = self.path.split("?")[0]
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth else None
        self.server.seen.append((path, token))
        if token not in (None, GOOD, NO_ACCESS):
            return self._answer(401, message="Invalid credentials in Authorization header")
        if "/resolve/" in path:
            repo, rest = path.lstrip("/").split("/resolve/", 1)
        elif path.startswith("/api/models/") and path.endswith("/auth-check"):
            repo, rest = path.removeprefix("/api/models/").removesuffix("/auth-check"), None
        else:
            return self._answer(404)  # model_info, file listings: the client copes without them
        if repo == GATED and token != GOOD:
            return self._answer(401 if token is None else 403, code="GatedRepo",
                                message=f"Access to model {repo} is restricted.")
        if repo == "teapot/broken":
            return self._answer(503)
        if repo not in (PUBLIC, GATED):
            return self._answer(401 if token is None else 404, code="RepoNotFound", message="Repository not found")
        if rest is None:
            return self._answer(200)
        file = Path(self.server.files_dir or "/nonexistent") / rest.split("/", 1)[1]
        if not file.is_file():
            return self._answer(404, code="EntryNotFound", message="Entry not found")
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def _answer(self, status, code=None, message=None):
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        body = json.dumps({"error": message} if message else {}).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.seen, server.files_dir = [], None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No token anywhere: env cleared, no Kaggle client, an empty stored-login path."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "kaggle_secrets", None)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_here"))
    return tmp_path


def fake_kaggle(monkeypatch, secrets):
    class UserSecretsClient:
        def get_secret(self, label):
            if label not in secrets:
                raise RuntimeError(f"secret {label} not attached")  # what Kaggle's client does
            return secrets[label]

    monkeypatch.setitem(sys.modules, "kaggle_secrets", types.SimpleNamespace(UserSecretsClient=UserSecretsClient))


def test_token_order(monkeypatch, no_token):
    from huggingface_hub import constants

    assert find_token() == (None, "nowhere (no token found)")
    stored = no_token / "stored"
    stored.write_text("hf_stored\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(stored))
    assert find_token() == ("hf_stored", "the stored Hugging Face login")
    fake_kaggle(monkeypatch, {"OTHER": "x"})  # secret not attached: falls through
    assert resolve_token() == "hf_stored"
    fake_kaggle(monkeypatch, {"HF_TOKEN": SECRET_OF_KAGGLE})
    assert find_token() == (SECRET_OF_KAGGLE, "the Kaggle secret HF_TOKEN")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_legacy")
    assert resolve_token() == "hf_legacy"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert find_token() == ("hf_env", "the HF_TOKEN environment variable")
    assert resolve_token("hf_explicit") == "hf_explicit"
    monkeypatch.setenv("HF_TOKEN", "  ")  # blank counts as unset
    assert resolve_token() == "hf_legacy"


def test_public_and_gated_with_access(hub, no_token, monkeypatch):
    server, url = hub
    assert "without a token" in preflight(PUBLIC, endpoint=url)
    monkeypatch.setenv("HF_TOKEN", GOOD)
    verdict = preflight(GATED, endpoint=url)
    assert verdict.startswith("ok:") and "HF_TOKEN environment variable" in verdict and GOOD not in verdict
    assert server.seen[-1] == (f"/api/models/{GATED}/auth-check", GOOD)  # the resolved token went over the wire


@pytest.mark.parametrize("repo, token, expected", [
    (GATED, None, ["gated", "no Hugging Face token", "HF_TOKEN", "Kaggle", f"https://huggingface.co/{GATED}"]),
    (GATED, NO_ACCESS, ["no access", "request access", f"https://huggingface.co/{GATED}"]),
    (GATED, "hf_revokedToken000", ["rejected your token", "create a new", "settings/tokens"]),
    (PRIVATE, None, ["no model", "check the id", "local model folder", "HF_TOKEN"]),
    (PRIVATE, GOOD, ["no model", "check the id", "local model folder"]),
    ("teapot/broken", None, ["HTTP 503", "try again later"]),
])
def test_failures_say_what_to_do(hub, no_token, repo, token, expected):
    with pytest.raises(AccessError) as info:
        preflight(repo, token=token, endpoint=hub[1])
    message = str(info.value)
    for part in expected:
        assert part in message
    assert token is None or token not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_model_loading_checks_access_before_any_download(hub, no_token, monkeypatch):
    from huggingface_hub import constants

    from lmsys_utils.model import load_tokenizer

    server, url = hub
    monkeypatch.setattr(constants, "ENDPOINT", url)  # what HF_ENDPOINT sets when read at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server.seen.clear()
    with pytest.raises(AccessError, match="gated model and no Hugging Face token"):
        load_tokenizer(GATED)
    assert server.seen == [(f"/api/models/{GATED}/auth-check", None)]  # nothing else was requested


def test_no_network(no_token):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connection refused, like a Kaggle run offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(AccessError, match="cannot reach the Hugging Face Hub.*/kaggle/input/llama-3"):
        preflight(GATED, endpoint=f"http://127.0.0.1:{port}")


def test_local_folder(tiny_model_dir, tmp_path):
    verdict = preflight(tiny_model_dir)  # no endpoint: any network call would fail the test
    assert verdict.startswith("ok: local llama model") and "tokenizer.json" in verdict
    with pytest.raises(AccessError, match="does not exist.*attach the model"):
        preflight(tmp_path / "missing")
    with pytest.raises(AccessError, match="no config.json"):
        preflight(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(AccessError, match="no tokenizer files"):
        preflight(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(AccessError, match="no weights"):
        preflight(tmp_path)


@pytest.mark.slow
def test_cli_uses_hf_endpoint_and_never_shows_the_token(hub, tiny_model_dir, tmp_path):
    """`python -m lmsys_utils preflight` in a fresh process: HF_ENDPOINT is read at import, as on Kaggle.

    After the access check it prints the memory plan, from the hub's config.json (downloaded with the token).
    """
    server, url = hub
    server.files_dir = tiny_model_dir
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    outputs = []
    for token, repo, rc in [(GOOD, GATED, 0), (NO_ACCESS, GATED, 1), ("hf_revokedToken000", GATED, 1),
                            (GOOD, PRIVATE, 1)]:
        env["HF_TOKEN"] = token
        run = subprocess.run([sys.executable, "-m", "lmsys_utils", "preflight", "--model", repo], env=env,
                             capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
        assert run.returncode == rc, run.stderr
        assert token not in run.stdout + run.stderr
        outputs.append(run.stdout + run.stderr)
    assert outputs[0].startswith("ok:") and "params, fp" in outputs[0] and "FITS" in outputs[0]
    assert "request access" in outputs[1] and "create a new" in outputs[2] and "check the id" in outputs[3]
    assert all(len(o.strip().splitlines()) == 1 for o in outputs[1:])  # one line, no traceback


RUN = """
import sys
from lmsys_utils.config import EncodingSettings
from lmsys_utils.model import add_lora, load_for_inference, save_adapter

model, tokenizer, _ = load_for_inference(sys.argv[1])
model = add_lora(model, r=2)
save_adapter(model, tokenizer, sys.argv[2], encoding=EncodingSettings())
print("saved adapter of", type(model.base_model.model).__name__)
"""


@pytest.mark.slow
def test_gated_hub_model_run_never_writes_the_token(hub, tiny_model_dir, tmp_path):
    """A fresh process loads the gated model from the hub with HF_TOKEN, adds LoRA and saves the adapter.

    The same token must reach every tokenizer and model download (the seed bug), and appear in nothing the
    run wrote: stdout, stderr, the adapter folder, the download cache.
    """
    server, url = hub
    server.files_dir, server.seen = tiny_model_dir, []
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": GOOD,
           "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_VERBOSITY": "debug", "HF_DEBUG": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    try:
        run = subprocess.run([sys.executable, "-c", RUN, GATED, str(tmp_path / "adapter")], env=env,
                             capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    finally:
        server.files_dir = None
    assert run.returncode == 0, run.stderr[-3000:]
    assert "saved adapter of LlamaForSequenceClassification" in run.stdout
    downloads = [(p, t) for p, t in server.seen if "/resolve/" in p]
    assert {p.rsplit("/", 1)[1] for p, _ in downloads} >= {"config.json", "tokenizer.json", "model.safetensors"}
    assert all(t == GOOD for _, t in downloads)

    assert GOOD not in run.stdout + run.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in written) and any(p.name == "adapter_config.json" for p in written)
    assert [p for p in written if GOOD.encode() in p.read_bytes()] == []
