"""A stand-in for the Python that ``benchmarks/gpu_check.sh`` calls (``PYTHON=...``), for rehearsing
the script on a machine without a GPU (tests/test_gpu_check.py).

It appends one JSON line per call to ``$STAND_IN_LOG``: ``argv``, whether ``$ROOT/tmps/kernels``
exists (b's fallback link) and, for a script, whether its arguments parsed. Per kind of call:

- ``-m pip ...`` and ``-m pytest ...``: nothing runs;
- ``-c CODE``: runs CODE (b's import check and gpu_check's module probes are real), except that
  with ``$STAND_IN_SKIP_IMPORT`` set a CODE that imports tmps (b's check: ~13 s of torch and
  Triton imports on a 2-core CPU) only prints;
- ``- < source``: compiles the source from stdin (a syntax error fails), runs nothing;
- ``path.py args``: runs the script until its ``argparse`` parser has parsed ``args``, then exits 0:
  every flag gpu_check passes must exist, with values of the right type and choice.

``$STAND_IN_RC`` (``substring=rc;substring=rc``) makes a call whose argv contains the substring
exit with that status instead.
"""
import argparse
import json
import os
import runpy
import sys


def log(record: dict) -> None:
    root = os.environ.get("ROOT", "")
    record["link"] = bool(root) and os.path.lexists(os.path.join(root, "tmps", "kernels"))
    with open(os.environ["STAND_IN_LOG"], "a") as f:
        f.write(json.dumps(record) + "\n")


def injected_rc(argv: list):
    line = " ".join(argv)
    for rule in filter(None, os.environ.get("STAND_IN_RC", "").split(";")):
        substring, _, rc = rule.rpartition("=")
        if substring in line:
            return int(rc)
    return None


def parse_only(script: str, args: list) -> None:
    """Run ``script`` as ``__main__`` until its parser returns, then exit 0 (2 on a usage error)."""
    parse_args = argparse.ArgumentParser.parse_args

    def parsed_then_exit(self, *a, **k):
        namespace = parse_args(self, *a, **k)  # a usage error exits 2 here
        log({"argv": [script, *args], "parsed": True})
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = parsed_then_exit
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    log({"argv": [script, *args], "parsed": False})  # the script returned without parsing arguments
    raise SystemExit(1)


def main(argv: list) -> int:
    rc = injected_rc(argv)
    if rc is not None:
        log({"argv": argv, "injected_rc": rc})
        print(f"stand-in: exit {rc} (STAND_IN_RC)")
        return rc
    if argv[:1] == ["-m"]:
        log({"argv": argv})
        return 0
    if argv[:1] == ["-c"]:
        log({"argv": argv})
        if os.environ.get("STAND_IN_SKIP_IMPORT") and "import tmps" in argv[1]:
            print("stand-in: tmps import skipped (STAND_IN_SKIP_IMPORT)")
            return 0
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<-c>", "exec"), {"__name__": "__main__"})
        return 0
    if argv[:1] == ["-"]:
        source = sys.stdin.read()
        try:
            compile(source, "<stdin>", "exec")
        except SyntaxError as exc:
            log({"argv": argv, "syntax_error": str(exc)})
            return 1
        log({"argv": argv, "compiled": len(source)})
        return 0
    parse_only(argv[0], argv[1:])
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
