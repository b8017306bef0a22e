"""Compile-only checks of the hand-written CUDA code in csrc/ (no GPU, any torch build):

  * every csrc/*.cu builds device-side for sm_80 and sm_90a and ptxas reports no register spills (needs nvcc);
  * every CUDA-only binding csrc/*_cuda*.cpp compiles with g++ (-fsyntax-only, -Wall -Wextra) against torch's
    include paths plus the CUDA include dir, so a typo in the host binding is caught on CPU machines (needs g++,
    the CUDA headers and torch's c10/cuda headers; skipped with the reason otherwise);
  * every op registered in csrc/*.cpp (``m.impl``) has the C++ argument and return types of its ``m.def`` schema
    (a mismatch throws when the extension loads, on GPU machines only for the CUDA bindings);
  * the layout rule of setup.py holds: no .cu (nor a csrc/ header it includes) contains code that can throw or
    touches torch (TORCH_CHECK, C10_CUDA_CHECK, throw, at::/c10::/torch::, torch headers): a c10::Error thrown
    from nvcc-compiled host code crashed the process on a GPU, so all of that lives in the g++-compiled bindings;
    and a csrc/*.cpp that needs CUDA headers is named *_cuda*.cpp (setup.py compiles those in the CUDA build only).

Every csrc/*.cu is compiled device-side (`nvcc -cubin`, one process per arch, in parallel) with the include paths and
flags a torch CUDAExtension build uses, so ptxas sees exactly the device code of the extension. A CPU-only torch
wheel ships the c10/cuda headers but not the CMake-generated c10/cuda/impl/cuda_cmake_macros.h; the test then puts
a stand-in (the one macro it defines) on the include path.

`GAINRL_NVCC_FULL=1` additionally runs the full host + device `nvcc -c` of every file (slow: ~80 s on 2 cores).
Run with `-s` to see the register / spill table.
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
# The CUDA-only g++ sources: keep the pattern in sync with setup.py.
CUDA_CPP_PATTERN = "*_cuda*.cpp"
CUDA_CPP_FILES = sorted(f for f in CSRC.glob("*.cpp") if fnmatch.fnmatch(f.name, CUDA_CPP_PATTERN))
ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
# Keep in sync with the nvcc extra_compile_args in setup.py.
SETUP_NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
# What torch.utils.cpp_extension adds for every .cu (COMMON_NVCC_FLAGS; fallback for old torch).
DEFAULT_TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None
    )


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def find_cuda_include() -> Path | None:
    """The CUDA toolkit include dir (with cuda_runtime_api.h), for g++ compiles of the host bindings."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if NVCC:
        candidates.append(str(Path(NVCC).resolve().parents[1]))
    candidates += ["/usr/local/cuda", *sorted((str(p) for p in Path("/usr/local").glob("cuda-*")), reverse=True)]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").is_file():
            return Path(c) / "include"
    return Path("/usr/include") if Path("/usr/include/cuda_runtime_api.h").is_file() else None


def torch_include_flags(shim_dir: Path, opt: str = "-I") -> list[str]:
    """torch's include paths (+ the cuda_cmake_macros.h stand-in when the wheel lacks it) and extension defines."""
    import torch
    import torch.utils.cpp_extension as cpp

    includes = cpp.include_paths()  # the CPU variant: torch/include and torch/csrc/api/include, no CUDA_HOME needed
    flags = [x for p in includes for x in (opt, str(p))]
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in includes):
        header = shim_dir / "c10/cuda/impl/cuda_cmake_macros.h"
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")  # what CMake generates
        flags += [opt, str(shim_dir)]
    return flags + [
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]


def torch_flags(shim_dir: Path) -> list[str]:
    import torch.utils.cpp_extension as cpp

    flags = torch_include_flags(shim_dir)
    flags += list(getattr(cpp, "COMMON_NVCC_FLAGS", DEFAULT_TORCH_NVCC_FLAGS))
    return flags + [f"-I{CSRC}"]


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {n: re.sub(r"\(.*", "", d).replace("gainrl::angle_stats::", "") for n, d in zip(names, out)}


def parse_ptxas(log: str, arch: str) -> dict[str, dict[str, int]]:
    """{mangled kernel: {registers, stack, spill_stores, spill_loads, smem}} from `-Xptxas -v` output for one arch
    (smem: static shared memory in bytes, 0 when the report names none)."""
    funcs: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '([^']+)'", line)
        if m:
            current = m.group(1) if m.group(2) == arch else None
            if current:
                funcs[current] = {}
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1) if m.group(1) in funcs else None
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            funcs[current].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            funcs[current]["registers"] = int(m[1])
            s = re.search(r"(\d+) bytes smem", line)
            funcs[current]["smem"] = int(s[1]) if s else 0
    return funcs


def nvcc_cmd(src: Path, arch: str, out: Path, flags: list[str]) -> list[str]:
    return [NVCC, "-cubin", "-gencode", ARCHS[arch], "-Xptxas=-v", *SETUP_NVCC_FLAGS, *flags, "-o", str(out), str(src)]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """{(file name, arch): (command, return code, log)}: every csrc/*.cu x arch, compiled in parallel."""
    tmp = tmp_path_factory.mktemp("nvcc")
    flags = torch_flags(tmp / "shim")
    jobs = {(f.name, a): nvcc_cmd(f, a, tmp / f"{f.stem}.{a}.cubin", flags) for f in CU_FILES for a in ARCHS}

    def run(cmd):
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        return cmd, p.returncode, p.stdout + p.stderr

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = dict(zip(jobs, pool.map(run, jobs.values())))
    return results


@needs_nvcc
@pytest.mark.skipif(not CU_FILES, reason="no csrc/*.cu")
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("src", [f.name for f in CU_FILES])
def test_no_register_spills(builds, src, arch):
    cmd, rc, log = builds[(src, arch)]
    assert rc == 0, f"nvcc failed ({' '.join(cmd)}):\n{log[-6000:]}"
    funcs = parse_ptxas(log, arch)
    assert funcs, f"ptxas reported no kernels for {src} on {arch}:\n{log[-3000:]}"
    names = demangle(list(funcs))
    table = "\n".join(
        f"  {arch:7s} {v.get('registers', -1):4d} regs  stack {v.get('stack', -1):4d}  "
        f"spill st/ld {v.get('spill_stores', -1)}/{v.get('spill_loads', -1)}  {names[k]}"
        for k, v in sorted(funcs.items(), key=lambda kv: names[kv[0]])
    )
    print(f"\n{src} ({' '.join(cmd)}):\n{table}")
    incomplete = [names[k] for k, v in funcs.items() if not {"spill_stores", "spill_loads", "registers"} <= set(v)]
    assert not incomplete, f"could not parse ptxas report for {incomplete}:\n{log[-3000:]}"
    spilled = [names[k] for k, v in funcs.items() if v["spill_stores"] or v["spill_loads"]]
    assert not spilled, f"register spills on {arch} in {spilled}:\n{table}"


@needs_nvcc
@pytest.mark.skipif(not CU_FILES, reason="no csrc/*.cu")
@pytest.mark.parametrize("src", [f.name for f in CU_FILES])
def test_no_warnings_in_our_sources(builds, src):
    """Warnings from torch's own headers are not ours; any warning located in csrc/ is."""
    ours = []
    for arch in ARCHS:
        _, rc, log = builds[(src, arch)]
        assert rc == 0
        ours += [ln for ln in log.splitlines() if "warning" in ln.lower() and str(CSRC) in ln]
        ours += [ln for ln in log.splitlines() if re.match(r"^csrc/\S+\(\d+\): warning", ln)]
    assert not ours, "\n".join(ours)


@needs_nvcc
@pytest.mark.skipif(not (CSRC / "angle_stats_cuda.cu").is_file(), reason="no angle_stats_cuda.cu")
@pytest.mark.parametrize("arch", list(ARCHS))
def test_angle_stats_kernel_set(builds, arch):
    """The launcher instantiates every chunk-kernel variant it can pick (3 dtypes x path x loads per row)."""
    _, rc, log = builds[("angle_stats_cuda.cu", arch)]
    assert rc == 0
    names = list(demangle(list(parse_ptxas(log, arch))).values())
    assert sum(n.startswith("void chunk_kernel<") for n in names) == 13, names
    assert "plan_kernel" in names and "reduce_kernel" in names, names


@needs_nvcc
@pytest.mark.skipif(os.environ.get("GAINRL_NVCC_FULL") != "1", reason="set GAINRL_NVCC_FULL=1 (slow)")
@pytest.mark.parametrize("src", [f.name for f in CU_FILES])
def test_full_compile(tmp_path, src):
    """Host + device `nvcc -c` for both archs in one call, as the extension build does."""
    flags = torch_flags(tmp_path / "shim")
    gencode = [x for a in ARCHS.values() for x in ("-gencode", a)]
    cmd = [NVCC, "-c", *gencode, *SETUP_NVCC_FLAGS, "-Xcompiler", "-fPIC", *flags, "-o", str(tmp_path / "x.o")]
    p = subprocess.run([*cmd, str(CSRC / src)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr


# ---------------------------------------------------------------------------------------------------- layout rules


def strip_comments(code: str) -> str:
    """C/C++ source without comments and string / char literal contents (so words in messages do not count);
    line breaks are kept, so line numbers stay right."""
    pattern = r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\''

    def blank(m: re.Match) -> str:
        text = m.group(0)
        if text[0] in "\"'":
            return text[0] * 2  # empty literal
        return " " + "\n" * text.count("\n")

    return re.sub(pattern, blank, code, flags=re.S)


def local_sources(src: Path) -> dict[Path, str]:
    """src and every csrc/ file it includes with #include "..." (transitively): {path: code without comments}."""
    out: dict[Path, str] = {}
    todo = [src]
    while todo:
        f = todo.pop()
        if f in out or not f.is_file():
            continue
        raw = f.read_text()
        out[f] = strip_comments(raw)
        todo += [f.parent / m for m in re.findall(r'^\s*#\s*include\s*"([^"]+)"', raw, flags=re.M)]
    return out


THROWING = re.compile(
    r"\b(TORCH_CHECK\w*|TORCH_INTERNAL_ASSERT\w*|C10_CUDA_CHECK\w*|C10_CUDA_KERNEL_LAUNCH_CHECK|AT_ERROR|AT_ASSERT\w*|"
    r"throw|at::|c10::|torch::)"
)
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|pybind11)/', flags=re.M)


def test_strip_comments_keeps_code():
    code = 'a(); // throw x\n/* TORCH_CHECK(\n) */ b("throw at::"); c(\'"\'); throw 1;'
    stripped = strip_comments(code)
    assert THROWING.findall(stripped) == ["throw"] and stripped.count("\n") == 2 and "throw" in stripped.splitlines()[2]


@pytest.mark.skipif(not CU_FILES, reason="no csrc/*.cu")
@pytest.mark.parametrize("src", [f.name for f in CU_FILES])
def test_cu_files_do_not_throw(src):
    """Device-side translation units return cudaError_t; throwing and torch code belong in *_cuda*.cpp (g++)."""
    found = []
    for path, code in local_sources(CSRC / src).items():
        # The includes are checked on the raw text: strip_comments blanks the quoted header names.
        found += [f"{path.name}: #include <{m}/...>" for m in TORCH_INCLUDE.findall(path.read_text())]
        for i, line in enumerate(code.splitlines(), 1):
            found += [f"{path.name}:{i}: {m}" for m in THROWING.findall(line)]
    assert not found, f"{src} (nvcc-compiled) must not throw or use torch; move this to a *_cuda*.cpp:\n" + "\n".join(
        found
    )


def _top_level_args(code: str, start: int) -> list[str]:
    """Arguments of the call whose '(' is at code[start], split at top-level commas (code without literals)."""
    depth, args, cur = 0, [], []
    for ch in code[start:]:
        if ch in "([{":
            depth += 1
            if depth == 1:
                continue
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                args.append("".join(cur))
                return args
        elif ch == "," and depth == 1:
            args.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    return args


@pytest.mark.parametrize("src", [f.name for f in sorted(CSRC.glob("*.cpp"))])
def test_checks_do_not_format_in_our_code(src):
    """TORCH_CHECK(cond, msg) with one message argument only (GAINRL_CHECK, csrc/check.h, builds longer messages
    with std::string): c10::str's ostream formatting in our .so crashed an H200 build (see check.h)."""
    code = strip_comments((CSRC / src).read_text())
    bad = []
    for m in re.finditer(r"\bTORCH_CHECK\s*\(", code):
        args = _top_level_args(code, m.end() - 1)
        if len(args) > 2:
            bad.append(f"{src}:{code[:m.start()].count(chr(10)) + 1}: TORCH_CHECK with {len(args) - 1} message args")
    assert not bad, "\n".join(bad)


CUDA_HEADER = re.compile(r'^\s*#\s*include\s*[<"](cuda[_a-z0-9]*\.h|c10/cuda/|ATen/cuda/)', flags=re.M)


@pytest.mark.parametrize("src", [f.name for f in sorted(CSRC.glob("*.cpp"))])
def test_cuda_cpp_naming(src):
    """A .cpp that needs CUDA headers must match *_cuda*.cpp, else the CPU-only build (CppExtension) breaks."""
    needs_cuda = [p.name for p in local_sources(CSRC / src) if CUDA_HEADER.search(p.read_text())]
    is_cuda_only = fnmatch.fnmatch(src, CUDA_CPP_PATTERN)
    assert is_cuda_only or not needs_cuda, f"{src} includes CUDA headers (via {needs_cuda}): rename it *_cuda*.cpp"


def gxx_binding_flags(tmp: Path) -> list[str]:
    """What a CUDAExtension build gives g++ for a .cpp, minus optimisation: torch + CUDA includes, defines."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    cuda_inc = find_cuda_include()
    if cuda_inc is None:
        pytest.skip("CUDA headers (cuda_runtime_api.h) not found: set CUDA_HOME")
    import torch.utils.cpp_extension as cpp

    if not any((Path(p) / "c10/cuda/CUDAGuard.h").is_file() for p in cpp.include_paths()):
        pytest.skip("this torch install ships no c10/cuda headers")
    # -isystem: warnings inside torch / CUDA headers are not ours; -Wall -Wextra still apply to csrc/.
    return [cxx, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", *torch_include_flags(tmp / "shim", "-isystem"),
            "-isystem", str(cuda_inc), f"-I{CSRC}"]


@pytest.mark.skipif(not CUDA_CPP_FILES, reason="no csrc/*_cuda*.cpp")
@pytest.mark.parametrize("src", [f.name for f in CUDA_CPP_FILES])
def test_cuda_binding_compiles_with_gxx(tmp_path, src):
    """The g++-compiled CUDA binding (TORCH_CHECK, allocation, CUDAGuard, registration) compiles and is warning-free.
    Also proves the launcher headers it includes are plain C++ (no CUDA device syntax)."""
    cmd = [*gxx_binding_flags(tmp_path), str(CSRC / src)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{(p.stdout + p.stderr)[-6000:]}"
    ours = [ln for ln in (p.stdout + p.stderr).splitlines() if "warning" in ln and ("csrc/" in ln or str(CSRC) in ln)]
    assert not ours, "\n".join(ours)


# ---------------------------------------------------------------------------------------------------- op schemas

SCHEMA_TYPES = {"Tensor": "Tensor", "Tensor?": "optional<Tensor>", "float": "double", "int": "int64_t", "bool": "bool"}


def registered_ops() -> list[tuple[str, str, str, str]]:
    """(op name, schema, implementing function, file) of every ``m.impl`` in csrc/*.cpp, with the ``m.def`` schema
    it implements (adjacent string literals joined)."""
    schemas: dict[str, str] = {}
    impls: list[tuple[str, str, str]] = []
    for src in sorted(CSRC.glob("*.cpp")):
        code = re.sub(r"//[^\n]*", "", src.read_text())
        for m in re.finditer(r"m\.def\(\s*((?:\"(?:\\.|[^\"\\])*\"\s*)+)\)", code):
            schema = "".join(re.findall(r"\"((?:\\.|[^\"\\])*)\"", m.group(1)))
            schemas[schema.split("(", 1)[0]] = schema
        impls += [(m.group(1), m.group(2), src.name) for m in re.finditer(r"m\.impl\(\"(\w+)\",\s*&(\w+)\)", code)]
    return [(name, schemas.get(name, ""), func, file) for name, func, file in impls]


def cpp_signature(func: str) -> tuple[str, list[str]]:
    """(return type, parameter types) of the definition of ``func`` in csrc/*.cpp, types without const/&/names."""
    for src in sorted(CSRC.glob("*.cpp")):
        code = re.sub(r"//[^\n]*", "", src.read_text())
        m = re.search(r"([\w:<>, ]+?)\s+" + func + r"\(([^)]*)\)\s*\{", code)
        if m:
            params = [re.sub(r"\bconst\b|&", "", p).split() for p in m.group(2).split(",") if p.strip()]
            norm = lambda t: t.replace("at::", "").replace("std::", "").replace(" ", "")  # noqa: E731
            return norm(m.group(1).split()[-1] if "<" not in m.group(1) else m.group(1).strip()), [
                norm(" ".join(p[:-1])) for p in params]
    raise AssertionError(f"no definition of {func} in csrc/*.cpp")


@pytest.mark.parametrize("op", registered_ops(), ids=lambda op: op[0] + "@" + op[3])
def test_op_schema_matches_cpp_signature(op):
    """Every ``m.impl`` function has the argument and return types of its ``m.def`` schema (Tensor / float / int /
    bool, Tensor? -> at::Tensor / double / int64_t / bool, std::optional<at::Tensor>). A mismatch throws when the extension is loaded, and only a
    machine that builds that file (the CUDA bindings: a GPU machine) would see it, with every op of the extension
    lost."""
    name, schema, func, file = op
    assert schema, f"{file}: m.impl of {name} without an m.def schema in csrc/*.cpp"
    args_text, ret_text = re.match(r"\w+\((.*)\)\s*->\s*(.*)", schema).groups()
    args = [SCHEMA_TYPES[a.split()[0].split("(")[0]] for a in args_text.split(",") if a.strip()]
    rets = [SCHEMA_TYPES[r.strip()] for r in ret_text.strip("()").split(",") if r.strip()]
    ret, params = cpp_signature(func)
    assert params == args, f"{file}: {func}{params} against the schema {schema}"
    expected_ret = "void" if not rets else rets[0] if len(rets) == 1 else "tuple<" + ",".join(rets) + ">"
    assert ret == expected_ret, f"{file}: {func} returns {ret}, the schema {ret_text}"
