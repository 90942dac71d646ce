"""Seeded fuzz suite (issue 16's acceptance): hundreds of mutants of a GGUF, a safetensors file, a
config.json, a safetensors index and a YAML preset through `qtool inspect`, `quantize` and `eval`.

Every run must end with a documented exit code (0, 2-9: never 1, which means a qtool bug, nor a
signal), print no traceback, finish within the timeout, stay under a peak RSS, print strict JSON
(exactly one document, no NaN/Infinity) under --json, leave no staged `.qtool-tmp-` entry and no
output after a failure, and leave its input untouched.

The runs go through a fork server (tests/_fuzz_server.py): the imports are paid once, each mutant
runs qtool's real entry point in a forked child. Mutations are seeded by (QTOOL_FUZZ_SEED, target,
case number), so a failure reported as `gguf #17` is the same file on every machine:

    QTOOL_FUZZ_CASES=400 pytest tests/test_fuzz.py          # more cases per target
    QTOOL_FUZZ_ONLY=gguf:17,config:3 pytest tests/test_fuzz.py   # rerun just those cases

Failing mutants are kept under the test's tmp dir (a few per kind of failure) with the command in
repro.sh; QTOOL_FUZZ_SAVE_DIR=DIR copies them there too, out of reach of pytest's pruning.
"""
from __future__ import annotations

import json
import os
import queue
import random
import re
import shlex
import shutil
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._fuzz_mutators import (GGUFLayout, mutate_config, mutate_gguf, mutate_index, mutate_safetensors,
                                  mutate_yaml)
from tests._fuzz_seeds import write_small_llama
from tests._fuzz_server import ForkServer, RunResult

# Every --json run, failed or not, prints exactly one document; a failure's has an "error" object.
# (False accepts an empty stdout on failure, as before qtool.cli printed error documents.)
STRICT_JSON_ERRORS = True

DOCUMENTED_EXIT_CODES = {0, 2, 3, 4, 5, 6, 7, 8, 9}
# Cases per target; the defaults keep the file at about 3-4 minutes on two cores.
DEFAULT_CASES = {"gguf": 160, "safetensors": 120, "config": 120, "index": 80, "yaml": 120}
CASES_OVERRIDE = int(os.environ["QTOOL_FUZZ_CASES"]) if os.environ.get("QTOOL_FUZZ_CASES") else None
BASE_SEED = int(os.environ.get("QTOOL_FUZZ_SEED", "0"))
# A run that spins is stopped by its CPU time (SIGXCPU), which the machine's load does not stretch;
# the wall-clock timeout catches runs that block.
CPU_LIMIT_S = float(os.environ.get("QTOOL_FUZZ_CPU_LIMIT", "20"))
TIMEOUT_S = float(os.environ.get("QTOOL_FUZZ_TIMEOUT", "120"))
# Peak RSS of the child, which starts from the worker's ~300 MB of imports (torch, transformers).
MAX_RSS_MB = float(os.environ.get("QTOOL_FUZZ_MAX_RSS_MB", "1500"))
# A hard stop above the RSS bound, so a runaway allocation fails fast instead of taking the machine.
ADDRESS_SPACE_EXTRA = 4 * 2**30
MAX_STDERR_BYTES = 64 * 1024
# Mutants run side by side, one fork server each: the suite is sized for two cores.
WORKERS = max(1, int(os.environ.get("QTOOL_FUZZ_WORKERS", "2")))
SAVED_PER_KIND = 3
SAVE_DIR = Path(os.environ["QTOOL_FUZZ_SAVE_DIR"]) if os.environ.get("QTOOL_FUZZ_SAVE_DIR") else None
VERBOSE = bool(os.environ.get("QTOOL_FUZZ_VERBOSE"))  # a line per case (with pytest -s)
# Terminal control characters (ESC, NUL, ...) that must never reach the user's terminal raw.
CONTROL_CHARS = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

EVAL_TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
    "in Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel "
    "Tower surpassed the Washington Monument to become the tallest man-made structure in the world, a title "
    "it held for 41 years until the Chrysler Building in New York City was finished in 1930. It was the first "
    "structure to reach a height of 300 metres. Due to the addition of a broadcasting aerial at the top of "
    "the tower in 1957, it is now taller than the Chrysler Building by 5.2 metres. Excluding transmitters, "
    "the Eiffel Tower is the second tallest free-standing structure in France after the Millau Viaduct.\n"
) * 3


def _only_cases() -> dict[str, set[int]] | None:
    spec = os.environ.get("QTOOL_FUZZ_ONLY")
    if not spec:
        return None
    chosen: dict[str, set[int]] = {}
    for item in spec.split(","):
        target, _, number = item.strip().partition(":")
        chosen.setdefault(target, set()).add(int(number))
    return chosen


# ------------------------------------------------------------------ seeds
@dataclass
class Seeds:
    tiny_dir: Path         # tiny Llama folder, one shard (read-only)
    sharded_dir: Path      # the same shapes in two shards with an index
    gguf: Path             # a small-vocabulary Llama as Q8_0 GGUF
    presets: list[Path]    # YAML presets from configs/
    text: Path             # text for eval


@pytest.fixture(scope="module")
def seeds(tiny_llama_dir: Path, smollm2_tokenizer_dir: Path, repo_root: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    from qtool.pipeline import QuantizeOptions, quantize
    from qtool.recipes import recipe_from_options
    from qtool.synthetic import SHAPES, write_synthetic_llama

    folder = tmp_path_factory.mktemp("fuzz-seeds")
    sharded = write_synthetic_llama(folder / "sharded", **SHAPES["tiny"], shards=2,
                                    tokenizer_from=smollm2_tokenizer_dir)
    # The GGUF seed has a 384-token vocabulary: see tests/_fuzz_seeds.py for why.
    gguf = folder / "small-q8_0.gguf"
    recipe = recipe_from_options(fmt="gguf", bits=None, scheme=None, gguf_type="Q8_0", config=None,
                                 block_size=None, group_size=None, double_quant=None, include=[], skip=[])
    quantize(str(write_small_llama(folder / "small", EVAL_TEXT)), gguf, recipe,
             QuantizeOptions(format="gguf", force=True))
    # Presets that run without calibration text (w8a8 needs --calib; a mutant may still ask for it).
    presets = [repo_root / "configs" / name for name in
               ("nf4.yaml", "int4.yaml", "int8-asym.yaml", "fp4.yaml", "gguf-q4_k_m.yaml", "gguf-q3_k_m.yaml")]
    text = folder / "eval.txt"
    text.write_text(EVAL_TEXT)
    return Seeds(tiny_llama_dir, sharded, gguf, [path for path in presets if path.is_file()], text)


@pytest.fixture(scope="module")
def fork_servers(repo_root: Path, seeds: Seeds, tmp_path_factory: pytest.TempPathFactory):
    """WORKERS fork servers, started side by side, each holding every module a good run of each command
    imports (transformers loads its model and tokenizer code lazily, seconds per child otherwise)."""
    with ThreadPoolExecutor(WORKERS) as pool:
        servers = list(pool.map(lambda _: ForkServer(repo_root), range(WORKERS)))
    warm_dir = tmp_path_factory.mktemp("fuzz-warm")
    text = ["--text", str(seeds.text), "--chunks", "1", "--ctx", "32", "--device", "cpu"]
    listings = servers[0].warm([
        ["inspect", str(seeds.gguf), "--json"],
        ["quantize", str(seeds.gguf), "-o", str(warm_dir / "a.gguf"), "--type", "Q8_0"],
        ["quantize", str(seeds.gguf), "-o", str(warm_dir / "b"), "--bits", "4"],
        ["eval", str(seeds.gguf), *text],
        ["eval", str(seeds.tiny_dir), *text],
        ["quantize", str(seeds.sharded_dir), "-o", str(warm_dir / "c"), "--config", str(seeds.presets[0])],
    ], warm_dir)
    for server in servers[1:]:
        for listing in listings:
            server.import_modules(listing)
    yield servers
    for server in servers:
        server.close()


# ------------------------------------------------------------------ one case
@dataclass
class Case:
    target: str
    number: int
    mutation: str
    args: list[str]
    input_root: Path       # everything under it must be left as it was
    output: Path           # the -o path (must not exist after a failed run)


def _link_folder(seed_dir: Path, dest: Path) -> None:
    """A copy of a seed folder made of hard links: free, and the seed's bytes are shared read-only."""
    dest.mkdir(parents=True)
    for item in seed_dir.iterdir():
        os.link(item, dest / item.name)


def _write_mutant(path: Path, data: bytes) -> None:
    # Unlink first: the path may be a hard link to the seed, which must keep its bytes.
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def _with_json(args: list[str], rng: random.Random) -> list[str]:
    return args + ["--json"] if rng.random() < 0.5 else args


def _model_commands(model: Path, extra_inspect: Path | None, out_dir: Path, seeds: Seeds,
                    rng: random.Random) -> tuple[list[str], Path]:
    """A command over a model (folder or file), chosen by weight: inspect and quantize often, eval less
    (it is the slowest)."""
    kind = rng.choices(["inspect", "quantize-gguf", "quantize-bits4", "eval"], weights=[4, 3, 3, 1.5])[0]
    if kind == "inspect":
        target = extra_inspect if extra_inspect is not None and rng.random() < 0.5 else model
        return _with_json(["inspect", str(target)], rng), out_dir / "none"
    if kind == "quantize-gguf":
        output = out_dir / "model.gguf"
        return _with_json(["quantize", str(model), "-o", str(output), "--type", "Q8_0"], rng), output
    if kind == "quantize-bits4":
        output = out_dir / "model"
        return _with_json(["quantize", str(model), "-o", str(output), "--bits", "4"], rng), output
    return _with_json(["eval", str(model), "--text", str(seeds.text), "--chunks", "1", "--ctx", "32",
                       "--device", "cpu"], rng), out_dir / "none"


def make_gguf_case(case_dir: Path, gguf_seed: bytes, seeds: Seeds, rng: random.Random,
                   layout: GGUFLayout) -> tuple[str, list[str], Path]:
    path = case_dir / "in" / "model.gguf"
    path.parent.mkdir(parents=True)
    data, mutation = mutate_gguf(gguf_seed, layout, rng)
    _write_mutant(path, data)
    args, output = _model_commands(path, None, case_dir / "out", seeds, rng)
    return mutation, args, output


def make_folder_case(case_dir: Path, seed_dir: Path, file_name: str, mutate: Callable, seeds: Seeds,
                     rng: random.Random, inspect_file: bool = False) -> tuple[str, list[str], Path]:
    folder = case_dir / "in" / "model"
    _link_folder(seed_dir, folder)
    data, mutation = mutate((seed_dir / file_name).read_bytes(), rng)
    _write_mutant(folder / file_name, data)
    args, output = _model_commands(folder, folder / file_name if inspect_file else None, case_dir / "out",
                                   seeds, rng)
    return mutation, args, output


def make_yaml_case(case_dir: Path, seeds: Seeds, rng: random.Random) -> tuple[str, list[str], Path]:
    preset_seed = rng.choice(seeds.presets)
    path = case_dir / "in" / "preset.yaml"
    path.parent.mkdir(parents=True)
    data, mutation = mutate_yaml(preset_seed.read_bytes(), rng)
    _write_mutant(path, data)
    output = case_dir / "out" / ("model.gguf" if preset_seed.name.startswith("gguf-") else "model")
    args = ["quantize", str(seeds.tiny_dir), "--config", str(path), "-o", str(output)]
    if rng.random() < 0.3:
        args.append("--dry-run")
    return f"{preset_seed.name}: {mutation}", _with_json(args, rng), output


# ------------------------------------------------------------------ checks
def _strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)  # json.loads also refuses a second document


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(root.rglob("*")) if path.is_file()}


def _last_line(stderr: bytes) -> str:
    lines = [line for line in stderr.decode("utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def check_run(case: Case, result: RunResult, input_before: dict, cwd: Path) -> list[str]:
    """Every way this run broke the contract, as short labels (grouped in the report by label)."""
    problems = []
    if result.timed_out:
        problems.append(f"hang (no exit after {TIMEOUT_S:.0f} s)")
    elif result.signal in (signal.SIGXCPU, signal.SIGKILL) and result.cpu_s >= CPU_LIMIT_S:
        problems.append(f"hang (stopped after {CPU_LIMIT_S:.0f} s of CPU)")
    elif result.signal is not None:
        problems.append(f"killed by signal {result.signal}")
    elif result.rc not in DOCUMENTED_EXIT_CODES:
        problems.append(f"exit {result.rc}" + (" (qtool bug)" if result.rc == 1 else " (undocumented)"))
    if b"Traceback (most recent call last)" in result.stderr:
        problems.append("traceback on stderr")
    if result.peak_rss_mb > MAX_RSS_MB:
        problems.append(f"peak RSS {result.peak_rss_mb:.0f} MB > {MAX_RSS_MB:.0f} MB")
    if len(result.stderr) > MAX_STDERR_BYTES:
        problems.append(f"stderr of {len(result.stderr)} bytes")
    as_json = "--json" in case.args
    if CONTROL_CHARS.search(result.stderr) or (not as_json and CONTROL_CHARS.search(result.stdout)):
        problems.append("raw control characters printed")
    if as_json and not result.timed_out:
        try:
            text = result.stdout.decode("utf-8")
        except UnicodeDecodeError:
            problems.append("--json stdout is not UTF-8")
        else:
            if text.strip() or result.rc == 0 or STRICT_JSON_ERRORS:
                try:
                    document = _strict_json(text)
                except ValueError as exc:
                    problems.append(f"--json stdout is not one strict JSON document ({str(exc)[:60]})")
                else:
                    if result.rc and STRICT_JSON_ERRORS and not (isinstance(document, dict) and "error" in document):
                        problems.append("--json failure without an error document")
    staged = [str(path) for path in case.output.parent.rglob("*") if ".qtool-tmp-" in path.name]
    # Nothing can clean up after SIGKILL or SIGXCPU: leftovers count only after an exit or SIGTERM.
    if staged and result.signal not in (signal.SIGKILL, signal.SIGXCPU):
        problems.append(f"staged output left behind ({Path(staged[0]).name})")
    if result.rc and result.rc != 10 and case.output.exists():  # 10: a signal after the output was complete
        problems.append("failed run left an output")
    if _snapshot(case.input_root) != input_before:
        problems.append("input changed")
    if any(cwd.iterdir()):
        problems.append(f"files written to the working folder ({next(cwd.iterdir()).name})")
    return problems


@dataclass
class Failure:
    case: Case
    result: RunResult
    problems: list[str]
    saved: Path | None

    def line(self) -> str:
        command = " ".join(self.case.args)
        where = f" saved: {self.saved}" if self.saved else ""
        return (f"{self.case.target} #{self.case.number} [{self.case.mutation[:160]}] `qtool {command[:300]}` "
                f"-> rc {self.result.rc}{'' if self.result.signal is None else f' signal {self.result.signal}'}, "
                f"{self.result.wall_s:.1f} s, {self.result.peak_rss_mb:.0f} MB: {', '.join(self.problems)}; "
                f"stderr: {_last_line(self.result.stderr)!r}{where}")


def _kind(case: Case, problems: list[str]) -> str:
    return f"{case.args[0]}: " + ", ".join(sorted(re.sub(r"\d+", "N", problem) for problem in problems))


# ------------------------------------------------------------------ the test
TARGETS = ["gguf", "safetensors", "config", "index", "yaml"]


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz(target: str, seeds: Seeds, fork_servers: list[ForkServer], tmp_path: Path) -> None:
    only = _only_cases()
    if only is not None and target not in only:
        return  # a rerun of other targets' cases: nothing of this one was asked for
    numbers = sorted(only[target]) if only else range(CASES_OVERRIDE or DEFAULT_CASES[target])
    gguf_seed = seeds.gguf.read_bytes() if target == "gguf" else b""
    layout = GGUFLayout(gguf_seed) if target == "gguf" else None
    seed_state = {path: _snapshot(path) for path in (seeds.tiny_dir, seeds.sharded_dir)}
    idle_servers: queue.Queue[ForkServer] = queue.Queue()
    for server in fork_servers:
        idle_servers.put(server)

    def run_case(number: int) -> tuple[Case, RunResult, list[str]]:
        rng = random.Random(f"{BASE_SEED}:{target}:{number}")
        case_dir = tmp_path / f"{target}-{number:04d}"
        if target == "gguf":
            mutation, args, output = make_gguf_case(case_dir, gguf_seed, seeds, rng, layout)
        elif target == "safetensors":
            mutation, args, output = make_folder_case(case_dir, seeds.tiny_dir, "model.safetensors",
                                                      mutate_safetensors, seeds, rng, inspect_file=True)
        elif target == "config":
            mutation, args, output = make_folder_case(case_dir, seeds.tiny_dir, "config.json", mutate_config,
                                                      seeds, rng)
        elif target == "index":
            mutation, args, output = make_folder_case(case_dir, seeds.sharded_dir, "model.safetensors.index.json",
                                                      mutate_index, seeds, rng)
        else:
            mutation, args, output = make_yaml_case(case_dir, seeds, rng)
        case = Case(target, number, mutation, args, case_dir / "in", output)
        (case_dir / "out").mkdir(exist_ok=True)
        cwd = case_dir / "cwd"
        cwd.mkdir()
        input_before = _snapshot(case.input_root)
        server = idle_servers.get()
        try:
            result = server.run(args, cwd=cwd, stdout_path=case_dir / "stdout.txt",
                                stderr_path=case_dir / "stderr.txt", timeout_s=TIMEOUT_S, cpu_limit_s=CPU_LIMIT_S,
                                address_space_extra_bytes=ADDRESS_SPACE_EXTRA)
        finally:
            idle_servers.put(server)
        problems = check_run(case, result, input_before, cwd)
        if VERBOSE:
            print(f"{target} #{number} rc {result.rc} {result.wall_s:.1f}s cpu {result.cpu_s:.2f}s "
                  f"{result.peak_rss_mb:.0f}MB {problems or ''} {args[0]} [{mutation[:100]}] "
                  f"{_last_line(result.stderr)[:120]!r}", flush=True)
        if not problems:
            shutil.rmtree(case_dir)
        return case, result, problems

    failures: list[Failure] = []
    saved_per_kind: dict[str, int] = {}
    with ThreadPoolExecutor(len(fork_servers)) as pool:
        # map() yields in case order, so which failures are kept does not depend on timing.
        for case, result, problems in pool.map(run_case, numbers):
            # Hard links share the seed's bytes: a run that wrote through one would spoil later cases.
            for path, state in seed_state.items():
                assert _snapshot(path) == state, f"{target} #{case.number} changed the seed folder {path}"
            if not problems:
                continue
            case_dir = case.input_root.parent
            kind = _kind(case, problems)
            saved_per_kind[kind] = saved_per_kind.get(kind, 0) + 1
            saved = None
            if saved_per_kind[kind] <= SAVED_PER_KIND:
                # Paths relative to the script, so a copied case folder still reproduces.
                shutil.copyfile(seeds.text, case_dir / "eval.txt")
                shown = [shlex.quote(arg).replace(str(case_dir), "$HERE").replace(str(seeds.text), "$HERE/eval.txt")
                         for arg in case.args]
                (case_dir / "repro.sh").write_text(
                    f"# {target} #{case.number} (QTOOL_FUZZ_SEED={BASE_SEED}): {case.mutation}\n"
                    f"# problems: {', '.join(problems)}\n"
                    'HERE="$(cd "$(dirname "$0")" && pwd)"\n'
                    f'rm -rf "$HERE/out" && mkdir "$HERE/out" && cd "$HERE/cwd" && qtool {" ".join(shown)}\n')
                saved = case_dir
                if SAVE_DIR is not None:  # pytest's tmp dirs are pruned by later runs (three are kept)
                    saved = SAVE_DIR / case_dir.name
                    shutil.rmtree(saved, ignore_errors=True)
                    shutil.copytree(case_dir, saved)
            else:
                shutil.rmtree(case_dir)
            failures.append(Failure(case, result, problems, saved))
    if failures:
        kinds: dict[str, int] = {}
        for failure in failures:
            kind = _kind(failure.case, failure.problems)
            kinds[kind] = kinds.get(kind, 0) + 1
        summary = "\n".join(f"  {count:4d} x {kind}" for kind, count in sorted(kinds.items(), key=lambda kv: -kv[1]))
        listing = "\n".join(failure.line() for failure in failures)
        pytest.fail(f"{len(failures)} of {len(numbers)} {target} mutants broke the contract "
                    f"(QTOOL_FUZZ_SEED={BASE_SEED}; rerun one with QTOOL_FUZZ_ONLY={target}:N):\n"
                    f"{summary}\n{listing}", pytrace=False)
