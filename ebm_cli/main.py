"""The ``ebm`` command: the top-level parser, the packages' subcommands gathered in one place, and ``main`` (parse,
claim the outputs, run, turn errors into exit statuses).

    ebm init | relax | train | info | demo               ebm_sim.commands (the simulator)
    ebm export-onnx | distill | baseline | robustness    distill.commands (the PyTorch side)
    ebm pipeline                                         ebm_pipeline.commands (the whole study)
    ebm hardware ...                                     hardware.commands (the neuromorphic mapping)

User mistakes (a missing or corrupt file, an unknown dataset, a network whose input size does not match the data,
bad settings, an output that exists or cannot be written) print ``ebm: error: <message>`` to stderr and exit with
status 2, never a traceback. A relaxation or training that diverges, and a full disk, exit with status 1; an
interrupted one (Ctrl-C) saves its progress, says how to resume and exits with status 130. Every output a command
names is declared with ``outputs.add_output_argument`` and claimed by ``main`` before the command runs (the rule of
ebm_sim/outputs.py: exists only with --overwrite or --resume, writable, one writer at a time).
"""
from __future__ import annotations

import argparse
import pickle
import sys
from contextlib import nullcontext

import distill.commands
import ebm_pipeline.commands
import ebm_sim.commands
import hardware.commands
from ebm_sim.batch_relax import RunError
from ebm_sim.commands import PROG, preset_train_defaults
from ebm_sim.distributed import env_secondary_rank
from ebm_sim.outputs import DiskFullError, claim_outputs

__all__ = ["PROG", "build_parser", "console_main", "main", "preset_train_defaults"]


def build_parser(train_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The ``ebm`` parser with every package's subcommands; ``train_defaults`` (``preset_train_defaults(argv)``)
    become the defaults of ``ebm train``."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="ebm-toolkit: simulate energy-based models (Hopfield energy, equilibrium "
                               "propagation) and manage their HDF5 artifacts.",
        epilog="Errors from user input print 'ebm: error: ...' and exit with status 2.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ebm_sim.commands.add_parsers(sub, train_defaults)
    distill.commands.add_parsers(sub)
    ebm_pipeline.commands.add_parsers(sub)
    hardware.commands.add_parsers(sub)
    return parser


USER_ERRORS = (ValueError, FileNotFoundError, OSError, pickle.UnpicklingError)
SIGPIPE_STATUS = 141  # what a shell reports for a program ended by SIGPIPE (128 + 13)


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _quiet_stdout() -> None:
    """After a closed pipe (``ebm info x.h5 | head``): send what is left of stdout to /dev/null, so that Python's
    final flush does not report the broken pipe as an error."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured in a test)
        pass


def main(argv=None) -> int:
    """Entry point of the ``ebm`` console script; returns the exit status (0 ok, 1 failed run or full disk, 2 user
    error, 130 interrupted, 141 output pipe closed by the reader). The outputs a command declares are checked and
    locked (ebm_sim.outputs: exists, --overwrite/--resume, writable, one writer) before it runs."""
    parser = build_parser(preset_train_defaults(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    try:
        # under torchrun (ebm_sim.distributed) rank 0 claims and writes the outputs; the other ranks only compute
        with (nullcontext() if env_secondary_rank() else claim_outputs(args, log=_note)):
            return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return SIGPIPE_STATUS
    except (RunError, FloatingPointError, DiskFullError) as e:  # a run that cannot finish (diverging, disk full)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError as e:  # what no check could foresee (the sizes a command can check are refused before)
        print(f"{PROG}: error: out of memory{': ' + str(e) if str(e) else ''}; use smaller batches, layers or "
              f"--limit", file=sys.stderr)
        return 1
    except USER_ERRORS as e:  # ArtifactError, OutputError and MemoryLimitError are ValueErrors
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The ``ebm`` console script: ``main``, then exit with its status. Ctrl-C from then on is ignored: the command
    has finished, and a KeyboardInterrupt in the interpreter's shutdown would only print a traceback."""
    import signal

    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":
    console_main()
