"""The attempt process: ``python -m stalwart.runtime.worker ATTEMPT_DIR``.

It loads the task (``loader``: a script as ``__mp_main__``, so its ``if __name__ == "__main__":``
block does not run again), calls it, or hands it to torch elastic (``elastic_launch``), and writes the
result or the exception with its traceback. Exit code 0 means success, 1 an exception in the task; anything
else (a signal, an OOM kill) the runner sees from the exit status alone. A task that cannot even be
loaded (its script fails to import, the function is not where it was, the inputs do not unpickle)
fails with ``TaskLoadError``, which is not retried: the next attempt would load the same files.
"""

from __future__ import annotations

import pickle
import sys
import traceback
from pathlib import Path

from ..atomic import write_atomic
from ..flash.preemption import Preempted
from .elastic_failures import WorkerFailedError
from .loader import call, leave_process_group, load, read_spec
from .processes import die_with_parent
from .protocol import RESULT_FILE, AttemptResult, dumps_output, failure_result


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m stalwart.runtime.worker ATTEMPT_DIR", file=sys.stderr)
        return 2
    die_with_parent()
    attempt_dir = Path(argv[0])
    spec = read_spec(attempt_dir)
    try:
        if spec.elastic is not None:
            from .elastic_launch import launch

            output_pickle = launch(spec, attempt_dir)  # rank 0's value, pickled where it was made
        else:
            output_pickle = dumps_output(call(*load(spec)))
            leave_process_group()
        result = AttemptResult(ok=True, output_pickle=output_pickle)
        payload = pickle.dumps(result)
    except BaseException as exc:  # every failure, SystemExit included, is reported to the runner
        if isinstance(exc, WorkerFailedError):  # the workers printed their own tracebacks
            result = exc.result
            print(f"stalwart: {result.description}", file=sys.stderr)
        elif isinstance(exc, Preempted):  # a clean stop, said in one line
            result = failure_result(exc)
            print(f"stalwart: {exc}", file=sys.stderr)
        else:
            result = failure_result(exc)
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        payload = pickle.dumps(result)
    sys.stdout.flush()
    sys.stderr.flush()
    write_atomic(attempt_dir / RESULT_FILE, payload, fsync=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
