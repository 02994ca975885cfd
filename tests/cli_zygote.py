"""Runs many command-line invocations quickly for tests/test_bad_inputs.py: torch, DeepSpeed and minillm are
imported once here, then every case runs in a process of its own, forked from this one, exactly as the
command line would run it (`python SCRIPT ARGS` or `python -m MODULE ARGS`): its own argv, working directory,
environment, stdout and stderr files, exit status.

    python tests/cli_zygote.py < cases.json > results.json
    cases.json: [{"argv": ["train_sft.py", "--lr", "-1"], "cwd": DIR, "stdout": FILE, "stderr": FILE}, ...]
"""
import atexit
import json
import os
import runpy
import signal
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_case(case: dict) -> int:
    """In the forked child: the invocation, as `python ...` would run it. Returns the exit status."""
    for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(case["cwd"])
    os.environ.update(case.get("env", {}))
    signal.alarm(case.get("timeout", 120))
    argv = case["argv"]
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]
            sys.modules.pop(argv[1], None)  # `python -m` runs the module fresh, as __main__
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = argv[0] if os.path.isabs(argv[0]) else os.path.join(ROOT, argv[0])
            sys.argv = [script, *argv[1:]]
            sys.path.insert(0, os.path.dirname(script))
            runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as e:  # what the interpreter would do with it
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def main():
    cases = json.load(sys.stdin)
    sys.path.insert(0, ROOT)
    import deepspeed  # noqa: F401  (imported once, before any fork)
    import torch  # noqa: F401

    import minillm.checkpoints  # noqa: F401
    import minillm.run_dir  # noqa: F401
    import minillm.engine  # noqa: F401
    results = []
    for case in cases:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run_case(case)
            finally:
                atexit._run_exitfuncs()  # as the interpreter does at exit (os._exit below skips it)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        results.append(os.waitstatus_to_exitcode(status))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
