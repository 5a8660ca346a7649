#!/usr/bin/env python
"""Foundation benchmark for modelfusion: training throughput of `fit` against a plain PyTorch loop, and
weight-matching time for MLPs of growing width. Prints markdown tables; writes JSON (or CSV) results.

    python bench/bench_foundation.py                 # full run (about 6-8 minutes on a 2-core CPU, less with a warm cache)
    python bench/bench_foundation.py --quick         # widths 512 and 1024, small sample counts (about a minute)
    python bench/bench_foundation.py --device cuda   # on a GPU

This is a script, never a test: nothing here asserts anything. See bench/README.md for how to read the output.
"""
from __future__ import annotations
import argparse, contextlib, shlex, dataclasses, datetime, json, os, platform, subprocess, sys, time, warnings, csv, io
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


from _env import *  # data folder, machine/commit/load helpers shared with the other benchmark
from _env import _pct, _proc_stat_busy
import numpy as np
import scipy
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from modelfusion.data import load_dataset, Data
from modelfusion.models import MLP
from modelfusion.training import fit, train, TrainConfig, model_config
from modelfusion.spec import mlp_spec
from modelfusion.methods.weight_matching import weight_matching


# ----------------------------------------------------------------------------------------------------------------------
# environment

# ----------------------------------------------------------------------------------------------------------------------
# 1. training throughput

def subset(data: Data, n: int, n_eval: int = 1000) -> Data:
    "The first `n` training samples; small evaluation sets so fit's final evaluation stays cheap."
    return dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n],
                               x_test=data.x_test[:n_eval], y_test=data.y_test[:n_eval])


def samples_for(width: int, base: int, bs: int, n_max: int) -> int:
    "Samples to train on at `width`: `base` at width 512, scaled by 512/width (the cost per sample grows ~ width^2, "
    "so this keeps each measurement to seconds), at least 4 batches, a whole number of batches, at most the data set."
    n = max(4 * bs, int(round(base * 512 / width / bs)) * bs)
    return min(n, n_max)


def run_fit(data: Data, width: int, n: int, bs: int, dev: torch.device, amp: bool, seed: int = 0) -> dict:
    "modelfusion's `fit` for one epoch on the first n samples. Throughput from fit's own timer of its epoch loop."
    sub = subset(data, n)
    cfg = TrainConfig(epochs=1, batch_size=bs, optimizer='adam', lr=1e-3, amp=amp)
    t0 = time.perf_counter()
    _, m = fit(model_config('mlp', sub, widths=[width] * 3), sub, cfg, seed=seed, device=str(dev), verbose=False)
    wall = time.perf_counter() - t0
    return {'loop_s': m['train_time_s'], 'wall_s': wall, 'samples_per_s': n / m['train_time_s'],
            'samples_per_s_wall': n / wall, 'train_loss': m['train_loss_history'][-1]}


def run_peer(data: Data, width: int, n: int, bs: int, dev: torch.device, amp: bool, seed: int = 0) -> dict:
    "The loop a user would otherwise write: DataLoader(TensorDataset(x, y), bs, shuffle=True), batches moved to the "
    "device, same MLP, Adam(lr=1e-3). Only the epoch loop is timed (model/optimizer construction is not)."
    x, y = data.x_train[:n].cpu(), data.y_train[:n].cpu()
    torch.manual_seed(seed)
    model = MLP(784, (width,) * 3, 10).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True)
    use_amp = amp and dev.type == 'cuda'
    sync(dev); t0 = time.perf_counter()
    model.train(); total = torch.zeros((), device=dev)
    for xb, yb in loader:
        xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
        with (torch.autocast('cuda', dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()): out = model(xb)
        loss = F.cross_entropy(out.float(), yb)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        total += loss.detach() * len(yb)
    loss_val = total.item() / n  # one host sync, as fit does once per epoch
    sync(dev); dt = time.perf_counter() - t0
    return {'loop_s': dt, 'samples_per_s': n / dt, 'train_loss': loss_val}


def bench_throughput(data: Data, widths: list[int], base: int, bs: int, repeats: int, dev: torch.device, amp: bool,
                     log) -> list[dict]:
    rows = []
    for w in widths:
        n = samples_for(w, base, bs, len(data.x_train))
        # warm-up: a few batches of each at this width (allocator, thread pools, cuBLAS/oneDNN kernels)
        nw = min(4 * bs, n)
        run_fit(data, w, nw, bs, dev, amp); run_peer(data, w, nw, bs, dev, amp)
        fits, peers = [], []
        for r in range(repeats):  # alternate, so slow drift of the machine hits both
            for fn, acc in ((run_fit, fits), (run_peer, peers)):
                with OtherLoad() as ol: res = fn(data, w, n, bs, dev, amp)
                acc.append({**res, 'other_load': ol.frac})
        bf = max(fits, key=lambda d: d['samples_per_s']); bp = max(peers, key=lambda d: d['samples_per_s'])
        paired = sorted(f['samples_per_s'] / p['samples_per_s'] for f, p in zip(fits, peers))
        loads = [d['other_load'] for d in fits + peers if d['other_load'] is not None]
        row = {'width': w, 'arch': f'784-{w}-{w}-{w}-10', 'samples': n, 'batch_size': bs, 'repeats': repeats,
               'fit_samples_per_s': bf['samples_per_s'], 'peer_samples_per_s': bp['samples_per_s'],
               'ratio': bf['samples_per_s'] / bp['samples_per_s'], 'paired_ratios': paired,
               'other_load_max': max(loads) if loads else None,
               'fit_samples_per_s_wall': max(f['samples_per_s_wall'] for f in fits),
               'fit_samples_per_s_all': [f['samples_per_s'] for f in fits],
               'peer_samples_per_s_all': [p['samples_per_s'] for p in peers],
               'fit_loss': bf['train_loss'], 'peer_loss': bp['train_loss']}
        rows.append(row)
        log(f"  throughput w={w}: n={n} fit {row['fit_samples_per_s']:.0f}/s, peer {row['peer_samples_per_s']:.0f}/s, "
            f"ratio {row['ratio']:.2f} (paired {', '.join(f'{x:.2f}' for x in paired)}), other load up to {_pct(row['other_load_max'])}")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 2. weight matching

def random_pair(width: int) -> tuple[dict, dict]:
    "Two MLPs 784-w-w-w-10 at initialisation, seeds 0 and 1."
    sds = []
    for s in (0, 1):
        torch.manual_seed(s); sds.append(MLP(784, (width,) * 3, 10).state_dict())
    return sds[0], sds[1]


def trained_pair(data: Data, width: int, epochs: int, n_train: int, bs: int, dev: torch.device, amp: bool, log) -> tuple:
    "Two MLPs trained by modelfusion.training.train (cached in ~/.cache/modelfusion), seeds 0 and 1."
    sub = data if n_train >= len(data.x_train) else dataclasses.replace(data, x_train=data.x_train[:n_train], y_train=data.y_train[:n_train])
    cfg = TrainConfig(epochs=epochs, batch_size=bs, amp=amp)
    out, accs, cached = [], [], []
    for s in (0, 1):
        t0 = time.perf_counter()
        tr = train(model_config('mlp', sub, widths=[width] * 3), sub, cfg, seed=s, device=str(dev), verbose=False)
        out.append(tr.state_dict); accs.append(tr.meta['metrics']['test_acc']); cached.append(tr.from_cache)
        log(f"  trained w={width} seed {s}: test acc {accs[-1]:.4f} ({'cache' if tr.from_cache else f'{time.perf_counter() - t0:.0f}s'})")
    return out[0], out[1], accs, cached


def match_row(sd_a: dict, sd_b: dict, width: int, kind: str, max_sweeps: int, dev: torch.device, extra: dict | None = None) -> dict:
    model = MLP(784, (width,) * 3, 10); spec = mlp_spec(model)
    t0 = time.perf_counter()
    with OtherLoad() as ol: res = weight_matching([sd_a, sd_b], spec, max_sweeps=max_sweeps, seed=0, device=str(dev))
    wall = time.perf_counter() - t0
    info = res.info
    # newer weight_matching reports 'converged' (no group left to re-solve); else infer it from the sweep count
    capped = not info['converged'] if 'converged' in info else info['sweeps'] >= max_sweeps
    return {'width': width, 'models': kind, 'max_sweeps': max_sweeps, 'wall_s': wall, 'loop_s': info['time_s'],
            'sweeps': info['sweeps'], 'solves': info['solves'], 'objective': info['objective'],
            'objective_identity': info['objective_identity'], 'capped': capped, 'other_load': ol.frac, **(extra or {})}


def bench_matching(data: Data, widths: list[int], trained_widths: list[int], args, dev: torch.device, log) -> list[dict]:
    rows = []
    for w in widths:
        ms = args.max_sweeps_large if w >= args.large_width else args.max_sweeps
        a, b = random_pair(w)
        rows.append(match_row(a, b, w, 'init (seeds 0, 1)', ms, dev))
        r = rows[-1]
        log(f"  match w={w} init: {r['wall_s']:.1f}s, {r['sweeps']} sweeps{' (capped)' if r['capped'] else ''}")
    for w in trained_widths:
        ms = args.max_sweeps_large if w >= args.large_width else args.max_sweeps
        a, b, accs, cached = trained_pair(data, w, args.train_epochs, args.train_samples, args.batch_size, dev, args.amp, log)
        n = min(args.train_samples, len(data.x_train))
        rows.append(match_row(a, b, w, f'trained {args.train_epochs} ep, {n // 1000}k (seeds 0, 1)', ms, dev,
                              {'test_acc': accs, 'from_cache': cached}))
        r = rows[-1]
        log(f"  match w={w} trained: {r['wall_s']:.1f}s, {r['sweeps']} sweeps{' (capped)' if r['capped'] else ''}")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# output

BUSY = 0.25  # share of the machine's CPU used by other processes above which timings are flagged


def render(meta: dict, thr: list[dict], mat: list[dict]) -> str:
    out = [f"modelfusion foundation benchmark, {meta['date']}",
           f"device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, torch threads {meta['threads']} of {os.cpu_count()} CPUs, "
           f"numpy {meta['numpy']}, scipy {meta['scipy']}, python {meta['python']}, commit {meta['commit']}",
           f"data: {meta['data']}", f"command: {meta['command']}",
           f"load average (1/5/15 min) at start {meta['loadavg_start']}, at end {meta.get('loadavg_end')}; total {meta.get('total_s', 0):.0f}s", '']
    if thr:
        out += ['Training throughput: one epoch of Adam, batch size %d, on the first n MNIST training samples '
                '(samples/s of the epoch loop; best of %d).' % (thr[0]['batch_size'], thr[0]['repeats']), '']
        out.append(md_table(['model', 'n', 'fit (samples/s)', 'peer DataLoader (samples/s)', 'ratio fit/peer',
                             'paired ratios (min-max)', 'fit end-to-end (samples/s)', 'other processes (max CPU share)'],
                            [[r['arch'], r['samples'], f"{r['fit_samples_per_s']:,.0f}", f"{r['peer_samples_per_s']:,.0f}",
                              f"{r['ratio']:.2f}", f"{r['paired_ratios'][0]:.2f}-{r['paired_ratios'][-1]:.2f}",
                              f"{r['fit_samples_per_s_wall']:,.0f}", _pct(r['other_load_max'])] for r in thr]))
        out.append('')
        busy = [r['other_load_max'] for r in thr if r['other_load_max'] is not None and r['other_load_max'] > BUSY]
        if busy:
            out += [f"WARNING: other processes used up to {_pct(max(busy))} of the machine's CPU during some throughput "
                    "measurements; on a CPU this can slow a run several-fold, so ratios in those rows are unreliable. "
                    "Rerun on a quiet machine (or compare rows whose paired ratios agree).", '']
    if mat:
        out += ['Weight matching (Git Re-Basin, coordinate descent, LSA on the CPU): MLP 784-w-w-w-10, B matched onto A.', '']
        out.append(md_table(['width', 'models', 'wall (s)', 'sweeps', 'solves', 's/solve', 'objective', 'identity objective',
                             'other processes (CPU share)', 'note'],
                            [[r['width'], r['models'], f"{r['wall_s']:.2f}", r['sweeps'], r['solves'],
                              f"{r['loop_s'] / max(1, r['solves']):.3f}", f"{r['objective']:.2f}", f"{r['objective_identity']:.2f}",
                              _pct(r['other_load']),
                              (f"capped at max_sweeps={r['max_sweeps']}, not converged" if r['capped'] else 'converged')
                              + (f"; test acc {r['test_acc'][0]:.3f}/{r['test_acc'][1]:.3f}"
                                 + ('' if all(r['from_cache']) else ' (trained in this run)') if 'test_acc' in r else '')]
                             for r in mat]))
        out.append('')
    return '\n'.join(out)


def write_out(path: Path, meta: dict, thr: list[dict], mat: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    if path.suffix == '.csv':
        buf = io.StringIO()
        keys = sorted({k for r in thr + mat for k in r} - {'fit_samples_per_s_all', 'peer_samples_per_s_all'})
        wr = csv.DictWriter(buf, ['section'] + keys, extrasaction='ignore')
        wr.writeheader()
        for sec, rows in (('throughput', thr), ('matching', mat)):
            for r in rows: wr.writerow({'section': sec, **{k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()}})
        tmp.write_text(buf.getvalue())
    else:
        tmp.write_text(json.dumps({'meta': meta, 'throughput': thr, 'matching': mat}, indent=2) + '\n')
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    p.add_argument('--widths', type=int, nargs='+', default=None, help='hidden widths (default 512 1024 2048 4096; --quick: 512 1024)')
    p.add_argument('--trained-widths', type=int, nargs='*', default=[512, 1024], help='widths also matched after training (subset of --widths)')
    p.add_argument('--quick', action='store_true', help='widths 512 and 1024, small sample counts (about a minute on a 2-core CPU)')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--samples', type=int, default=None,
                   help='training samples at width 512 for the throughput test, scaled by 512/width for wider models '
                        '(default: 10240 on the CPU, 2560 with --quick, 240000 on CUDA; capped at the training set)')
    p.add_argument('--repeats', type=int, default=None, help='timed repeats per measurement, best reported (default 3; 2 with --quick)')
    p.add_argument('--amp', action='store_true', help='bf16 autocast on CUDA in both fit and the peer (default: fp32 in both)')
    p.add_argument('--max-sweeps', type=int, default=100, help='weight matching max_sweeps (the library default)')
    p.add_argument('--max-sweeps-large', type=int, default=10, help='max_sweeps for widths >= --large-width (bounds the 4096 row)')
    p.add_argument('--large-width', type=int, default=4096)
    p.add_argument('--train-epochs', type=int, default=2, help='epochs for the trained models that are matched')
    p.add_argument('--train-samples', type=int, default=None, help='training samples for those models (default: all; 10000 with --quick)')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: leave as is)')
    p.add_argument('--skip', choices=['throughput', 'matching'], nargs='*', default=[], help='sections to skip')
    p.add_argument('--out', default=None, help="JSON or .csv file for the results (default bench/results/foundation_<device>[_quick].json; '' for none)")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == 'cuda' and not torch.cuda.is_available(): p.error('--device cuda but CUDA is not available')
    if args.threads: torch.set_num_threads(args.threads)
    widths = args.widths or ([512, 1024] if args.quick else [512, 1024, 2048, 4096])
    trained_widths = [w for w in args.trained_widths if w in widths]
    if args.samples is None: args.samples = 240000 if dev.type == 'cuda' else (2560 if args.quick else 10240)
    if args.repeats is None: args.repeats = 2 if args.quick else 3
    if args.train_samples is None: args.train_samples = 10000 if args.quick else 10**9
    if args.out is None: args.out = str(HERE/'results'/f"foundation_{dev.type}{'_quick' if args.quick else ''}.json")
    log = lambda s: print(s, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        data = load_dataset('mnist', allow_sample=True, device='cpu')
    for w in caught: log(f"warning: {w.message}")
    meta = {'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'command': shlex.join(['python', 'bench/bench_foundation.py'] + (argv if argv is not None else sys.argv[1:])),
            'device': str(dev), 'device_name': device_name(dev), 'torch': torch.__version__, 'threads': torch.get_num_threads(),
            'numpy': np.__version__, 'scipy': scipy.__version__, 'python': platform.python_version(), 'commit': git_commit(),
            'data': f"{data.source}: {len(data.x_train)} train / {len(data.x_test)} test",
            'MODELFUSION_DATA': repo_rel(os.environ.get('MODELFUSION_DATA', '')), 'args': {**vars(args), 'out': repo_rel(args.out)}, 'loadavg_start': loadavg()}
    log(f"data: {meta['data']}; device {dev} ({meta['device_name']}), {meta['threads']} threads")

    meta['complete'] = False  # partial results are saved after each section, in case the run is interrupted
    thr = [] if 'throughput' in args.skip else bench_throughput(data, widths, args.samples, args.batch_size, args.repeats, dev, args.amp, log)
    if args.out: write_out(Path(args.out), meta, thr, [])
    mat = [] if 'matching' in args.skip else bench_matching(data, widths, trained_widths, args, dev, log)
    meta['total_s'] = time.perf_counter() - t_start; meta['loadavg_end'] = loadavg(); meta['complete'] = True

    print(render(meta, thr, mat))
    if args.out:
        write_out(Path(args.out), meta, thr, mat); log(f"wrote {args.out}")


if __name__ == '__main__':
    main()
