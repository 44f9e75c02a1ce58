"""Cold reads of one safetensors file with its header as written vs padded to 4 KiB (NOTES.md 29).

Writes the same bf16 tensors (a mix of ``gemma_stream.benchmark.mixes`` at 2 GiB) twice: once with the
header as safetensors writes it (tensors start 8 + header bytes in, no tensor page-aligned), once with
the header padded with spaces to a 4 KiB boundary (the format allows it).  Then, in rounds, each load
in a fresh process after evicting both files: ``gs.load_state_dict`` and a 2-thread pread of the
whole file (16 MiB pieces dealt to the threads in turn, one shared descriptor) into fresh memory::

    ROUNDS=8 python benchmarks/pad_header_probe.py few_large      # files kept under /work/exp/pad
"""
import json, os, struct, subprocess, sys, time, statistics
ROOT = os.environ.get("PAD_ROOT", "/work/exp/pad")
HERE = os.path.dirname(os.path.abspath(__file__))
def write(path, specs, pad):
    import torch
    header, off = {}, 0
    for name, shape in specs:
        n = 2
        for d in shape: n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-(8 + len(h)) % 4096)
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h))); f.write(h)
        for name, shape in specs:
            f.write(torch.randn(*shape, generator=g).bfloat16().view(torch.int16).numpy().tobytes())
        f.flush(); os.fsync(f.fileno())
def child(kind, path):
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    import ctypes, threading
    import gemma_stream as gs
    t = time.perf_counter()
    if kind == "gs":
        gs.load_state_dict(path)
    else:
        size = os.path.getsize(path)
        libc = ctypes.CDLL(None)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        buf = libc.mmap(None, size, 3, 0x22, -1, 0)
        libc.madvise(ctypes.c_void_p(buf), ctypes.c_size_t(size), 15)  # NOHUGEPAGE
        fd = os.open(path, os.O_RDONLY)
        step = 16 << 20
        def run(k):
            for off in range(k * step, size, 2 * step):
                n = min(step, size - off)
                mv = (ctypes.c_char * n).from_address(buf + off)
                os.preadv(fd, [mv], off)
        ts = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        [x.start() for x in ts]; [x.join() for x in ts]
    print(time.perf_counter() - t)
if sys.argv[1] == "child":
    child(sys.argv[2], sys.argv[3]); sys.exit()
sys.path.insert(0, os.path.join(HERE, "..", "python"))
from gemma_stream.benchmark.mixes import mix_specs
os.makedirs(ROOT, exist_ok=True)
mix = sys.argv[1] if len(sys.argv) > 1 else "few_large"
files = {}
for pad in (False, True):
    p = f"{ROOT}/{mix}-{'pad' if pad else 'plain'}.safetensors"
    if not os.path.exists(p):
        write(p, mix_specs(mix, 2 << 30), pad)
    files["pad" if pad else "plain"] = p
res = {}
entries = [(k, f) for k in ("bound", "gs") for f in ("plain", "pad")]
for r in range(int(os.environ.get("ROUNDS", "5"))):
    order = entries[r % 4:] + entries[:r % 4]
    for kind, f in order:
        for p in files.values():
            fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
        out = subprocess.run([sys.executable, __file__, "child", kind, files[f]], capture_output=True, text=True)
        res.setdefault((kind, f), []).append(float(out.stdout.strip().splitlines()[-1]))
for k, v in res.items():
    v = sorted(v); print(mix, k, "median %.3f (%.3f-%.3f)" % (statistics.median(v), v[0], v[-1]))
