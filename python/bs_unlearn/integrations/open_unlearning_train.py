"""Run open-unlearning's own ``src/train.py`` with the BST / BSS drop-ins registered, the checkout left unmodified.

From the root of an open-unlearning checkout (or with ``--checkout DIR`` anywhere among the arguments):

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
PROG = "open_unlearning_train"
EXTRA_HINT = "pip install -e '.[open-unlearning]' in the bs_kernels repository installs open-unlearning's dependencies"


def _fail(message: str) -> SystemExit:
    """The launcher's one-line error (SystemExit prints it on stderr and exits with status 1)."""
    return SystemExit(f"{PROG}: error: {message}")


def _split_checkout(argv: list[str]) -> tuple[Path, list[str]]:
    """``--checkout DIR`` / ``--checkout=DIR`` wherever it stands (hydra has no option of that name), and the rest."""
    checkouts, rest = [], []
    arguments = iter(argv)
    for argument in arguments:
        if argument == "--checkout":
            value = next(arguments, None)
            if not value:
                raise _fail("--checkout needs the open-unlearning checkout directory")
            checkouts.append(value)
        elif argument.startswith("--checkout="):
            checkouts.append(argument.split("=", 1)[1])
        else:
            rest.append(argument)
    if len(checkouts) > 1:
        raise _fail(f"--checkout given {len(checkouts)} times ({', '.join(checkouts)}); give it once")
    if checkouts and not checkouts[0]:
        raise _fail("--checkout needs the open-unlearning checkout directory")
    return (Path(checkouts[0]).expanduser() if checkouts else Path.cwd()), rest


def prepare(checkout: str | Path) -> Path:
    """Put ``checkout/src`` first on ``sys.path`` and register BST/BSS; returns the path of ``src/train.py``.

    ``trainer`` (open-unlearning's package) is imported before ``open_unlearning``, so BST and BSS subclass its
    own GradDiff rather than the stand-in on ``transformers.Trainer``. Each way this can fail is one line naming
    the cause: not a checkout, a dependency of the checkout missing (that ImportError would otherwise make
    ``open_unlearning`` fall back to the stand-in), another ``trainer`` module imported first, or
    ``open_unlearning`` imported first.
    """
    checkout = Path(checkout).expanduser().resolve()
    src = checkout / "src"
    for needed in ("train.py", "trainer/__init__.py"):
        if not (src / needed).is_file():
            raise _fail(
                f"{checkout} is not an open-unlearning checkout (no src/{needed}); run from its root or pass "
                "--checkout DIR"
            )
    imported_first = "bs_unlearn.integrations.open_unlearning" in sys.modules
    sys.path.insert(0, str(src))
    try:
        import trainer  # open-unlearning's src/trainer
        import trainer.unlearn.grad_diff  # noqa: F401  (what BST/BSS subclass)
    except ImportError as error:
        raise _fail(f"cannot import open-unlearning's trainer package from {src}: {error} ({EXTRA_HINT})") from error
    trainer_file = Path(trainer.__file__).resolve()
    if src not in trainer_file.parents:
        raise _fail(
            f"a module named trainer was imported from {trainer_file} before {src} was on sys.path; run the launcher "
            "as its own process: python -m bs_unlearn.integrations.open_unlearning_train"
        )

    from . import open_unlearning

    if not open_unlearning.OPEN_UNLEARNING_AVAILABLE:
        reason = "was imported before" if imported_first else "could not import open-unlearning's GradDiff although"
        raise _fail(
            f"bs_unlearn.integrations.open_unlearning {reason} {src} was on sys.path, so BST/BSS do not subclass "
            "open-unlearning's GradDiff; import this module first"
        )
    open_unlearning.register()
    return src / "train.py"


def main(argv: list[str] | None = None) -> None:
    checkout, hydra_args = _split_checkout(list(sys.argv[1:] if argv is None else argv))
    train_script = prepare(checkout)
    if not any(arg.startswith("hydra.searchpath=") for arg in hydra_args):
        hydra_args.append(f"hydra.searchpath=[file://{CONFIG_DIR}]")
    sys.argv = [str(train_script), *hydra_args]
    runpy.run_path(str(train_script), run_name="__main__")


if __name__ == "__main__":
    main()
