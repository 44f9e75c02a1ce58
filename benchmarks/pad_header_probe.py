"""Cold reads of one safetensors file with its header as written vs padded to 4 KiB (NOTES.md 29).

Writes the same bf16 tensors (a mix of ``gemma_stream.benchmark.mixes`` at 2 GiB) twice: once with the
header as safetensors writes it (tensors start 8 + header bytes in, no tensor page-aligned), once with
the header padded with spaces to a 4 KiB boundary (the format allows it).  Then, in rounds, each load
in a fresh process after evicting both files: ``gs.load_state_dict`` and a 2-thread pread of the
whole file (16 MiB pieces dealt to the threads in turn, one shared descriptor) into fresh memory::

    ROUNDS=8 python benchmarks/pad_header_probe.py few_large      # files kept under /work/exp/pad

The control (NOTES.md 30): ``plain2``, a byte-identical copy of the unpadded file written later, and
``bound_fd``, the 2-thread pread with contiguous halves and a descriptor per thread (page-aligned
pieces on every file).  On this VM the same reader on two identical files differed by up to 2x cold::

    ROUNDS=6 python benchmarks/pad_header_probe.py few_large --control
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
    import ctypes, threading
    try:
        import gemma_stream as gs   # the installed package (a checkout's python/ has no engine unless built)
    except ImportError:
        sys.path.insert(0, os.path.join(HERE, "..", "python"))
        import gemma_stream as gs
    t = time.perf_counter()
    if kind == "gs":
        gs.load_state_dict(path)
    else:   # a 2-thread pread of the whole file, 16 MiB pieces, into fresh plain-page memory
        size, step = os.path.getsize(path), 16 << 20
        libc = ctypes.CDLL(None)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        base = libc.mmap(None, size, 3, 0x22, -1, 0)
        libc.madvise(ctypes.c_void_p(base), ctypes.c_size_t(size), 15)  # NOHUGEPAGE
        half = (size // 2) & ~4095
        shared = os.open(path, os.O_RDONLY)
        def run(k):
            if kind == "bound_fd":   # contiguous halves, a descriptor per thread
                fd, end = os.open(path, os.O_RDONLY), size if k else half
                offsets = range(k * half, end, step)
            else:                    # pieces dealt in turn, one shared descriptor
                fd, end, offsets = shared, size, range(k * step, size, 2 * step)
            for off in offsets:
                n = min(step, end - off)
                os.preadv(fd, [(ctypes.c_char * n).from_address(base + off)], off)
        ts = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        [x.start() for x in ts]; [x.join() for x in ts]
    print(time.perf_counter() - t)
if sys.argv[1] == "child":
    child(sys.argv[2], sys.argv[3]); sys.exit()
try:
    from gemma_stream.benchmark.mixes import mix_specs
except ImportError:
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    from gemma_stream.benchmark.mixes import mix_specs
os.makedirs(ROOT, exist_ok=True)
mix = sys.argv[1] if len(sys.argv) > 1 else "few_large"
control = "--control" in sys.argv
files = {}
for pad in (False, True):
    p = f"{ROOT}/{mix}-{'pad' if pad else 'plain'}.safetensors"
    if not os.path.exists(p):
        write(p, mix_specs(mix, 2 << 30), pad)
    files["pad" if pad else "plain"] = p
if control:
    files["plain2"] = f"{ROOT}/{mix}-plain2.safetensors"
    if not os.path.exists(files["plain2"]):
        subprocess.run(["cp", "--reflink=never", files["plain"], files["plain2"]], check=True)
        os.sync()
res = {}
entries = [(k, f) for k in ("bound", "gs") + (("bound_fd",) if control else ()) for f in files]
for r in range(int(os.environ.get("ROUNDS", "5"))):
    order = entries[r % len(entries):] + entries[:r % len(entries)]
    for kind, f in order:
        for p in files.values():
            fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
        out = subprocess.run([sys.executable, __file__, "child", kind, files[f]], capture_output=True, text=True)
        res.setdefault((kind, f), []).append(float(out.stdout.strip().splitlines()[-1]))
for k, v in res.items():
    v = sorted(v); print(mix, k, "median %.3f (%.3f-%.3f)" % (statistics.median(v), v[0], v[-1]))
