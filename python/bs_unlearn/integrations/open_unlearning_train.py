"""Run open-unlearning's own ``src/train.py`` with the BST / BSS drop-ins registered, the checkout left unmodified.

From the root of an open-unlearning checkout (or with ``--checkout DIR`` first):

    python -m bs_unlearn.integrations.open_unlearning_train --config-name=unlearn.yaml \\
        experiment=unlearn/tofu/default trainer=BST task_name=tofu_bst

Every other argument goes to hydra unchanged. Before ``src/train.py`` runs this puts the checkout's ``src/`` on
``sys.path``, imports its ``trainer`` package, adds ``BST`` and ``BSS`` to its ``TRAINER_REGISTRY``
(``open_unlearning.register``) and appends ``hydra.searchpath=[file://<this package>/configs]``, where
``trainer/BST.yaml`` and ``trainer/BSS.yaml`` live. That is all the two-line edit of ``src/trainer/__init__.py``
plus copying the YAML would do (docs/integrations.md), without touching the checkout.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _split_checkout(argv: list[str]) -> tuple[Path, list[str]]:
    if argv[:1] == ["--checkout"]:
        if len(argv) < 2:
            raise SystemExit("--checkout needs the open-unlearning checkout directory")
        return Path(argv[1]), argv[2:]
    if argv and argv[0].startswith("--checkout="):
        return Path(argv[0].split("=", 1)[1]), argv[1:]
    return Path.cwd(), argv


def prepare(checkout: str | Path) -> Path:
    """Put ``checkout/src`` first on ``sys.path`` and register BST/BSS; returns the path of ``src/train.py``.

    ``trainer`` (open-unlearning's package) is imported before ``open_unlearning``, so BST and BSS subclass its
    own GradDiff rather than the stand-in on ``transformers.Trainer``.
    """
    checkout = Path(checkout).resolve()
    train_script = checkout / "src" / "train.py"
    if not train_script.is_file():
        raise SystemExit(
            f"{checkout} is not an open-unlearning checkout (no src/train.py); run from its root or pass --checkout DIR"
        )
    sys.path.insert(0, str(train_script.parent))
    import trainer  # noqa: F401  (open-unlearning's src/trainer)

    from . import open_unlearning

    if not open_unlearning.OPEN_UNLEARNING_AVAILABLE:
        raise SystemExit(
            f"bs_unlearn.integrations.open_unlearning was imported before {checkout}/src was on sys.path, so BST/BSS "
            "do not subclass open-unlearning's GradDiff; import this module first"
        )
    open_unlearning.register()
    return train_script


def main(argv: list[str] | None = None) -> None:
    checkout, hydra_args = _split_checkout(list(sys.argv[1:] if argv is None else argv))
    train_script = prepare(checkout)
    if not any(arg.startswith("hydra.searchpath=") for arg in hydra_args):
        hydra_args.append(f"hydra.searchpath=[file://{CONFIG_DIR}]")
    sys.argv = [str(train_script), *hydra_args]
    runpy.run_path(str(train_script), run_name="__main__")


if __name__ == "__main__":
    main()
