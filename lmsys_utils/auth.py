"""Find the Hugging Face token, and check access to a model before anything is downloaded.

The token is read at use time and never printed, logged or put in a message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
KAGGLE_MODEL_EXAMPLE = "/kaggle/input/llama-3/transformers/8b-chat-hf/1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
HOW_TO_SET_TOKEN = ("set the HF_TOKEN environment variable, or on Kaggle add a secret named HF_TOKEN "
                    "(Add-ons > Secrets)")


class AccessError(RuntimeError):
    """The model cannot be used as named; the message says why and what to do."""


def find_token(token: str | None = None) -> tuple[str | None, str]:
    """The token and where it came from (the source is safe to show; the token is not)."""
    if token:
        return token, "the token argument"
    for name in TOKEN_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value, f"the {name} environment variable"
    value = _kaggle_secret("HF_TOKEN")
    if value:
        return value, "the Kaggle secret HF_TOKEN"
    value = _stored_login()
    if value:
        return value, "the stored Hugging Face login"
    return None, "nowhere (no token found)"


def resolve_token(token: str | None = None) -> str | None:
    """Explicit arg, then HF_TOKEN / HUGGING_FACE_HUB_TOKEN, then the Kaggle secret HF_TOKEN, then the stored login."""
    return find_token(token)[0]


def _kaggle_secret(name: str) -> str | None:
    try:
        from kaggle_secrets import UserSecretsClient
    except ImportError:
        return None
    try:
        value = UserSecretsClient().get_secret(name)
    except Exception:  # the client raises when the secret is not attached to this notebook: not an error here
        return None
    if not isinstance(value, str):
        return None
    return value.strip() or None


def _stored_login() -> str | None:
    # The file `hf auth login` writes; read directly because get_token() would consult the environment again.
    try:
        return Path(constants.HF_TOKEN_PATH).read_text().strip() or None
    except OSError:
        return None


def is_local(name_or_path) -> bool:
    """True for an existing path or anything spelled like a path (hub ids look like `org/name`)."""
    text = str(name_or_path)
    return Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1


def preflight(name_or_path, token: str | None = None, endpoint: str | None = None) -> str:
    """Check that a model can be loaded, before any download; return a one-line verdict or raise AccessError.

    Args:
        name_or_path: a hub id (`meta-llama/Meta-Llama-3-8B-Instruct`) or a local model directory.
        token: a Hugging Face token; None resolves it (see `resolve_token`).
        endpoint: the hub URL (default: HF_ENDPOINT or https://huggingface.co).
    """
    if is_local(name_or_path):
        return _check_local(Path(str(name_or_path)).expanduser())
    token, source = find_token(token)
    return _check_hub(str(name_or_path), token, source, endpoint)


def _check_local(path: Path) -> str:
    if not path.is_dir():
        raise AccessError(f"model folder {path} does not exist: check the path, or on Kaggle attach the model "
                          f"as an input (Add Input > Models) so it appears under /kaggle/input")
    if not (path / "config.json").is_file():
        raise AccessError(f"{path} has no config.json: point at the folder that holds config.json and the weights "
                          f"(on Kaggle Models it is the numbered version folder, e.g. {KAGGLE_MODEL_EXAMPLE})")
    tokenizer_files = [f for f in TOKENIZER_FILES if (path / f).is_file()]
    if not tokenizer_files:
        raise AccessError(f"{path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): copy the "
                          f"tokenizer next to config.json or use the full model folder")
    weights = sorted(p.name for p in path.glob("*.safetensors")) or sorted(p.name for p in path.glob("*.bin"))
    if not weights:
        raise AccessError(f"{path} has config.json but no weights (*.safetensors or *.bin): the download is "
                          f"incomplete or this is not a model folder")
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "unknown")
    return (f"ok: local {model_type} model at {path} (config.json, {', '.join(tokenizer_files)}, "
            f"{len(weights)} weight file(s)); no token or network needed")


def _check_hub(repo_id: str, token: str | None, source: str, endpoint: str | None) -> str:
    page = f"https://huggingface.co/{repo_id}"
    offline = (f"cannot reach the Hugging Face Hub to check {repo_id} (no internet, e.g. a Kaggle submission): "
               f"use a local model folder instead, such as a Kaggle Models input like {KAGGLE_MODEL_EXAMPLE}")
    # Every AccessError below is raised `from None`: the library's chain carries request details a user need not see.
    try:
        # token=False, not None: None would make the client look for a token again by itself
        HfApi(endpoint=endpoint).auth_check(repo_id, token=token or False)
    except GatedRepoError:
        if token is None:
            raise AccessError(f"{repo_id} is a gated model and no Hugging Face token was found: {HOW_TO_SET_TOKEN}, "
                              f"and accept the license at {page}") from None
        raise AccessError(f"your token (from {source}) has no access to the gated model {repo_id}: request "
                          f"access / accept the license at {page} while logged in, then wait for approval") from None
    except RepositoryNotFoundError:
        hint = "" if token else f"; if it is private or gated, {HOW_TO_SET_TOKEN}"
        raise AccessError(f"no model {repo_id} on the Hugging Face Hub: check the id (organisation/name, "
                          f"case matters) or use a local model folder{hint}") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status == 401:
            raise AccessError(f"the Hugging Face Hub rejected your token (from {source}): it is invalid or "
                              f"expired; create a new read token at https://huggingface.co/settings/tokens "
                              f"and set it again ({HOW_TO_SET_TOKEN})") from None
        if status == 403:
            raise AccessError(f"your token (from {source}) may not read {repo_id}: a fine-grained token needs "
                              f"read access to public gated repos; create a read token at "
                              f"https://huggingface.co/settings/tokens") from None
        raise AccessError(f"the Hugging Face Hub answered HTTP {status} for {repo_id}: try again later, "
                          f"or use a local model folder such as {KAGGLE_MODEL_EXAMPLE}") from None
    except OfflineModeIsEnabled:
        raise AccessError(offline + " (HF_HUB_OFFLINE is set)") from None
    except Exception as e:
        if _is_network_error(e):
            raise AccessError(offline) from None
        raise
    who = f"with the token from {source}" if token else "without a token (public model)"
    return f"ok: {repo_id} is accessible on the Hugging Face Hub {who}"


def _is_network_error(e: Exception) -> bool:
    # huggingface_hub raises requests' errors (OSError subclasses) before 1.0 and httpx' TransportError after.
    names = {cls.__name__ for cls in type(e).__mro__}
    return isinstance(e, OSError) or "TransportError" in names or "RequestError" in names

