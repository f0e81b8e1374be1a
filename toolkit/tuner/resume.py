"""Resume: a card's stable search id, its project folder and the state kept there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from toolkit import tracking
from toolkit.config import FILE_SUFFIXES, ExperimentConfig


def search_id(cfg: ExperimentConfig) -> str:
    """A stable id for a card's search: the same card resumes, a changed card starts anew.

    ``tuner.max_trials``, ``tracking`` and ``train.epoch_state`` are left out, so a search can
    be extended, moved, and given state saving.
    A user's data file counts by content: the same card over an edited file is a new search,
    since resuming would mix trials trained on different data.
    """
    card = cfg.to_dict()
    card["tuner"].pop("max_trials", None)
    card.pop("tracking", None)
    # Saving state changes nothing that is learnt: turning it on keeps the search resumable.
    card["train"].pop("epoch_state", None)
    source = Path(cfg.data.source).expanduser()
    if cfg.data.source.lower().endswith(FILE_SUFFIXES) and source.is_file():
        card["data"]["content_sha256"] = _file_sha256(source)
    # The user's builder file counts by content too: an edited model is a new search.
    if cfg.model.builder is not None:
        builder_file = Path(cfg.model.builder.rpartition(":")[0])
        if builder_file.suffix == ".py" and builder_file.is_file():
            card["model"]["content_sha256"] = _file_sha256(builder_file)
    digest = hashlib.sha256(json.dumps(card, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.name}-{digest}"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def project_dir(uri: str, cfg: ExperimentConfig) -> Path:
    """Where KerasTuner keeps this card's state: a stable path under the store, for resume.

    A card tracked in another experiment (``tracking.experiment``) gets a folder of its own, so
    it starts its own search there and never adopts the other experiment's parent run.
    """
    base = tracking.store_dir(uri) / "tuner"
    experiment = cfg.tracking.experiment
    if experiment and experiment != cfg.name:
        return base / experiment / cfg.name
    return base / cfg.name


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def resolved_card_yaml(cfg: ExperimentConfig) -> str:
    """The resolved card as YAML, as stored in ``experiment.yaml``."""
    card = cfg.to_dict()
    if (card.get("tracking") or {}).get("uri"):  # never a password in a stored card
        from toolkit.security import redact_uri

        card["tracking"]["uri"] = redact_uri(card["tracking"]["uri"])
    return yaml.safe_dump(card, sort_keys=False)
