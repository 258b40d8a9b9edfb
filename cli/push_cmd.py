"""`evosparse push DIR REPO_ID`: upload a pruned checkpoint folder to the Hugging Face hub.

The folder goes up as it is (weights, tokenizer, report.json, recipe.yaml, and README.md, which
the hub shows as the model card; a folder from an older evosparse gets its card written from
report.json first). Where the hub cannot be reached (offline machines, HF_HUB_OFFLINE) the
command says so in one line before touching anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlsplit

from evosparse.pruning.errors import EvosparseError


class PushError(EvosparseError):
    """The folder cannot be pushed: not a checkpoint, no network, no credentials, refused by the hub."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a pruned checkpoint folder (with its model card) to the Hugging Face hub",
                       description="Upload DIR to the hub repository REPO_ID (created if missing). Credentials: "
                                   "--token, else HF_TOKEN or a saved `hf auth login`.")
    p.add_argument("dir", help="the output folder of `evosparse prune` (or any Hugging Face model folder)")
    p.add_argument("repo_id", help="hub repository, e.g. my-org/smollm2-135m-60-evolutionary")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to push to (default: main)")
    p.add_argument("--message", default=None, help="commit message (default: names the evosparse job)")
    p.add_argument("--token", default=None, help="hub token (default: HF_TOKEN or the saved login)")
    p.set_defaults(func=cmd_push)


def check_folder(folder: Path) -> None:
    """A loadable checkpoint: config.json and weights; the card is (re)written from report.json if absent."""
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise PushError(f"{folder} holds no Hugging Face checkpoint (config.json and *.safetensors)")
    if not (folder / "README.md").is_file() and (folder / "report.json").is_file():
        import json

        from evosparse.worker.model_card import write_card

        write_card(folder, json.loads((folder / "report.json").read_text()))


def check_hub_reachable() -> str:
    """The hub endpoint, after checking it answers; PushError saying why not otherwise."""
    from evosparse.pruning.config import offline_requested
    from evosparse.pruning.hub import unreachable
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    advice = "copy the folder to a machine with network access and run `evosparse push` there"
    if offline_requested():
        raise PushError(f"HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: not uploading; unset it, or {advice}")
    url = urlsplit(endpoint)
    why = unreachable(url.hostname or "", url.port or (443 if url.scheme == "https" else 80), timeout=5.0)
    if why is not None:
        raise PushError(f"cannot reach the Hugging Face hub at {endpoint} from this machine ({why}); {advice}")
    return endpoint


def push(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         message: str | None = None, token: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder``; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"invalid repository id {repo_id!r}: {exc}") from None
    check_folder(folder)
    check_hub_reachable()
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=message or f"evosparse: upload {folder.name}")
    except LocalTokenNotFoundError:
        raise PushError("no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`") from None
    except HfHubHTTPError as exc:
        raise PushError(f"the hub refused the upload: {str(exc).splitlines()[0]}") from None
    return str(getattr(info, "commit_url", info))


def cmd_push(args: argparse.Namespace) -> int:
    url = push(Path(args.dir), args.repo_id, private=args.private, revision=args.revision, message=args.message,
               token=args.token)
    print(f"pushed {args.dir} to {args.repo_id}: {url}")
    return 0
