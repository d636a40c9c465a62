"""Every Triton kernel variant the launchers use compiles for the GPU (sm_80 and sm_90).

Triton compiles ahead of time without a GPU, so this catches what the CPU interpreter
cannot: unsupported ops, type errors in lowering, shared memory beyond the chip's limit,
registers spilled to local memory.
Each kernel module lists its launched variants in ``aot_specializations()``.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

# Largest shared memory one block may use: sm_80 (A100) 163 KB, sm_90 (H100) 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}

_SCRIPT = textwrap.dedent(r"""
    import importlib, json, os, pkgutil, re, subprocess, sys, tempfile
    import triton
    import triton.backends.nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import fastvision.triton_kernels as package

    CUOBJDUMP = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")

    def resources(cubin):  # registers and local memory (> 0: spilled registers); {} without cuobjdump
        if not os.path.exists(CUOBJDUMP):
            return {}
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) .*LOCAL:(\d+)", out)
        return {"registers": int(m.group(1)), "local": int(m.group(2))} if m else {}

    modules = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] else None
    results = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or (modules and info.name not in modules):
            continue
        module = importlib.import_module(f"fastvision.triton_kernels.{info.name}")
        if not hasattr(module, "aot_specializations"):
            continue
        for kernel, signature, constexprs, options in module.aot_specializations():
            for arch in (80, 90):
                name = f"{info.name}.{kernel.__name__}[{signature.get(next(iter(signature)))}, {constexprs}] sm_{arch}"
                try:
                    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                    results.append({"name": name, "arch": arch, "shared": compiled.metadata.shared,
                                    **resources(compiled.asm["cubin"])})
                except Exception as exc:
                    results.append({"name": name, "arch": arch, "error": f"{type(exc).__name__}: {exc}"[:2000]})
    print(json.dumps(results))
""")


def compile_all(modules=""):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, modules], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_variant_compiles_for_sm80_and_sm90():
    results = compile_all()
    assert results, "no kernel declared aot_specializations()"
    errors = [f"{r['name']}: {r['error']}" for r in results if "error" in r]
    assert not errors, "\n".join(errors)
    over = [f"{r['name']}: {r['shared']} B" for r in results if r["shared"] > SHARED_LIMIT[r["arch"]]]
    assert not over, "shared memory over the limit:\n" + "\n".join(over)
    spills = [f"{r['name']}: {r['registers']} registers, {r['local']} B local" for r in results if r.get("local")]
    assert not spills, "registers spilled to local memory:\n" + "\n".join(spills)
