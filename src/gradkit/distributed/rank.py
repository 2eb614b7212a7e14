"""Entry point of one worker process started by the launcher: ``python -m gradkit.distributed.rank SPEC``.

``SPEC`` is the launcher's JSON (:func:`gradkit.distributed.launch.launch_spec`): the run's
configuration, the launcher's ``sys.path`` and the modules that registered a method, model or dataset
outside gradkit, imported here before anything is built. Errors are printed as one line naming the
rank, like the CLI does; the exit code is the CLI's (2 bad input, 1 failure, 130 interrupted).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path

from gradkit.errors import GradkitError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m gradkit.distributed.rank SPEC.json (started by gradkit train --workers)",
              file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(format="%(message)s", stream=sys.stderr,
                        level=logging.INFO if rank == 0 else logging.WARNING)
    sys.path.extend(p for p in spec.get("sys_path", []) if p not in sys.path)
    # After logging: importing torch takes a while.
    from gradkit.config import TrainConfig
    from gradkit.distributed.backend import train_rank

    try:
        for module in spec.get("plugins", []):
            importlib.import_module(module)
        train_rank(TrainConfig.from_dict(spec["config"]))
    except GradkitError as exc:
        if exc.exit_code == 130:
            if rank == 0:  # every rank stopped at the same step; one line is enough
                print(f"gradkit train: {exc}", file=sys.stderr)
        else:
            print(f"gradkit train: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
