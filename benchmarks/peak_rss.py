"""Run a Python script or module in this process and record its peak RSS (VmHWM) when it exits.

Usage: python benchmarks/peak_rss.py RESULT_FILE (-m MODULE | SCRIPT) [ARGS...]

ru_maxrss of a child process includes its parent's peak, because Linux carries it over fork and exec,
whereas VmHWM belongs to the address space that exec creates. So the benchmark runs each command
through this wrapper.
"""

import atexit
import runpy
import sys


def record_peak(path: str) -> None:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                with open(path, "w", encoding="ascii") as result:
                    result.write(str(int(line.split()[1]) * 1024))
                return


def main() -> None:
    result_file, *command = sys.argv[1:]
    atexit.register(record_peak, result_file)
    if command[0] == "-m":
        sys.argv = [command[1], *command[2:]]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")


if __name__ == "__main__":
    main()
