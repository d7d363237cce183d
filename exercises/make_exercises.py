"""Write the learner notebooks exercises/NN_name.ipynb from the solutions in exercises/solutions/.

Each solution notebook is the one source of its exercise. In its code cells the answer sits between two
marker lines:

    def q_sample(x0, noise, t):
        ### BEGIN SOLUTION
        alpha_bar = SD15.alphas_cumprod[t]
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        ### END SOLUTION

The learner version replaces everything from BEGIN to END (markers included) by one line,
`raise NotImplementedError("your code here")`, at the BEGIN marker's indentation, and clears every
output and execution count. Everything else (markdown, imports, the function's signature and docstring,
the check cell) is kept as it is.

Regenerating never overwrites a learner's work. `exercises/.generated.json` records the SHA-256 of
each file as this script last wrote it; a learner file is (re)written only when it does not exist or
is still byte-identical to that record. An edited file is left alone with a message — delete or rename
it to get the new version.

    python exercises/make_exercises.py            # solutions/ -> exercises/
    python exercises/make_exercises.py --check    # exit 1 if a learner file is missing or stale (CI)
"""

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
PLACEHOLDER = 'raise NotImplementedError("your code here")'
MANIFEST = ".generated.json"


class MarkerError(ValueError):
    """A solution notebook's markers are missing or do not pair up."""


def strip_solutions(source: str, where: str) -> tuple[str, int]:
    """The code with each BEGIN…END block replaced by the placeholder; and how many blocks there were."""
    out, inside, blocks = [], False, 0
    for number, line in enumerate(source.split("\n"), start=1):
        marker = line.strip()
        if marker == BEGIN:
            if inside:
                raise MarkerError(f"{where}, line {number}: '{BEGIN}' inside another solution block.")
            inside, blocks = True, blocks + 1
            indent = line[: len(line) - len(line.lstrip())]
            out.append(indent + PLACEHOLDER)
        elif marker == END:
            if not inside:
                raise MarkerError(f"{where}, line {number}: '{END}' without a '{BEGIN}' before it.")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise MarkerError(f"{where}: '{BEGIN}' is never closed by '{END}'.")
    return "\n".join(out), blocks


def learner_notebook(solution: dict, name: str = "notebook") -> dict:
    """The learner version of a solution notebook (a parsed .ipynb dict)."""
    notebook = copy.deepcopy(solution)
    blocks = 0
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        code, found = strip_solutions(source, f"{name}, cell {index}")
        blocks += found
        cell["source"] = code.splitlines(keepends=True)
        cell["outputs"] = []
        cell["execution_count"] = None
        cell["metadata"].pop("execution", None)  # nbclient's timing records, if any
    if blocks == 0:
        raise MarkerError(f"{name} has no '{BEGIN}' … '{END}' block: there is nothing for the learner to write.")
    return notebook


def serialize(notebook: dict) -> bytes:
    # The layout nbformat itself writes (indent 1, sorted keys, UTF-8, final newline), so Jupyter saving
    # an untouched notebook does not change its bytes.
    return (json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def learner_bytes(solution_path: Path) -> bytes:
    solution = json.loads(Path(solution_path).read_text(encoding="utf-8"))
    return serialize(learner_notebook(solution, Path(solution_path).name))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def generate(solutions: Path = HERE / "solutions", out: Path = HERE, log=print) -> dict[str, str]:
    """Write the learner notebooks; returns {file name: "written" | "updated" | "unchanged" | "kept (edited)"}."""
    solutions, out = Path(solutions), Path(out)
    paths = sorted(solutions.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no solution notebooks (NN_name.ipynb) in {solutions}")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    status = {}
    for path in paths:
        target = out / path.name
        data = learner_bytes(path)
        if not target.exists():
            status[path.name] = "written"
        else:
            current = target.read_bytes()
            if current == data:
                status[path.name] = "unchanged"
            elif sha256(current) == manifest.get(path.name):
                status[path.name] = "updated"
            else:
                status[path.name] = "kept (edited)"
                log(f"{target}: kept — it differs from what this script last wrote, so it holds your work. "
                    f"Delete or rename it to get the new version.")
                continue
        if status[path.name] != "unchanged":
            target.write_bytes(data)
            log(f"{target}: {status[path.name]}")
        manifest[path.name] = sha256(data)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return status


def stale(solutions: Path = HERE / "solutions", out: Path = HERE) -> list[str]:
    """Learner files that are missing or differ from what the solutions generate (for CI)."""
    problems = []
    for path in sorted(Path(solutions).glob("[0-9][0-9]_*.ipynb")):
        target = Path(out) / path.name
        if not target.exists() or target.read_bytes() != learner_bytes(path):
            problems.append(path.name)
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--solutions", type=Path, default=HERE / "solutions", help="folder of solution notebooks")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the learner notebooks")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a learner file is stale")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale(args.solutions, args.out)
        for name in problems:
            print(f"{args.out / name}: missing or not what {args.solutions / name} generates; "
                  "run python exercises/make_exercises.py")
        return 1 if problems else 0
    generate(args.solutions, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
