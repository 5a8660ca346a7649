#!/usr/bin/env python
"""C2M3 benchmark (issue 11, item 7): wall time and Frank-Wolfe iterations of `c2m3` against the number of models N and
against width, on MLPs 784-w-w-w-10 trained 3 epochs on MNIST (seeds 0..N-1, the `mnist_mlp_many` pool's training;
through the model cache, so a first run trains them).

For each case the script runs `c2m3` with its defaults (Sinkhorn start, exact line search, relative stopping rule,
refinement by MergeMany's rounds) and records the wall time, the time split (gradients, exact steps, assignments,
refinement), the Frank-Wolfe steps and why they stopped, and the objective f (sum over all pairs of models of the
weight-matching similarity in the universe) after projection and after refinement.

**The reference algorithm's objective.** The reference code (crisostomi/cycle-consistent-model-merging) runs the same
Frank-Wolfe iteration from the same Sinkhorn start, but picks each step with `scipy.optimize.fminbound` (xtol 1e-3,
at most 20 evaluations of the objective) and stops once the objective has gained less than 1e-6 (absolute) for 5
steps, at most 200 steps. With `--reference-rule` (cases N in `--ref-n`) the script also runs that rule inside this
implementation (fminbound on the exact quartic, which is the objective along the step) and records its projected
objective: what the reference algorithm reaches, computed two orders of magnitude faster than its own code.

    python bench/c2m3.py --threads 2                    # N = 2..10 at width 512, widths 128, 256, 512 at N = 5
    python bench/c2m3.py --threads 2 --ref-n 3 5 10     # and the reference's rule at N = 3, 5, 10
    python bench/c2m3.py --threads 1 --n 2 3 5 7 10 --ref-n 3 10 --widths 128 256 512   # the recorded run (~5 min)
    python bench/c2m3.py --quick --threads 1            # N = 2, 3 at width 512
    python bench/c2m3.py --device cuda                  # products on the GPU (the assignments stay on the CPU)

A script, never a test: it asserts nothing. It prints markdown tables and writes bench/results/c2m3_<device>.json.
"""
from __future__ import annotations
import argparse, datetime, json, platform, sys, time, warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _env import *  # data folder, machine/commit/load helpers shared with the other benchmarks
from _env import _pct
import numpy as np
import torch
from scipy.optimize import fminbound

from modelfusion.data import load_dataset
from modelfusion.models import build_model
from modelfusion.trace import spec_for
from modelfusion.training import train, model_config, TrainConfig
from modelfusion.methods import c2m3 as C
from modelfusion.methods.c2m3 import c2m3, universe_objective, ConvergenceWarning

TRAIN = TrainConfig(epochs=3, batch_size=128, lr=1e-3)  # the mnist_mlp_many pool's training


def models(data, width: int, n: int):
    "n MLPs 784-w-w-w-10 trained on MNIST from seeds 0..n-1 (model cache), their spec."
    cfg = model_config('mlp', data, widths=[width] * 3)
    sds = [train(cfg, data, TRAIN, seed=s, verbose=False).state_dict for s in range(n)]
    return sds, spec_for(build_model(cfg), data.x_train[:2])


def reference_rule(sds, spec, dev, max_iter: int = 200) -> dict:
    "The reference's Frank-Wolfe: fminbound steps (xtol 1e-3, 20 evaluations), stop after 5 steps of gain < 1e-6."
    pieces = C._pieces([{k: v.to(dev) for k, v in sd.items()} for sd in sds], spec)
    P = C._init({g: grp.size for g, grp in spec.groups.items()}, len(sds), 'sinkhorn', 0, dev)
    for pc in pieces: pc.start(P)
    assign, old, patience, it, t0 = C._Assign(torch.get_num_threads()), 0.0, 0, 0, time.time()
    for it in range(1, max_iter + 1):
        G = {g: p.new_zeros(p.shape) for g, p in P.items()}
        for pc in pieces: pc.grad(G)
        inv = assign(G)
        c = sum(pc.coeffs(inv) for pc in pieces).numpy()[::-1]
        t = float(fminbound(lambda s: -np.polyval(c, s), 0, 1, xtol=1e-3, maxfun=20))
        new = float(np.polyval(c, t))
        for pc in pieces: pc.step(t)
        C._move(P, inv, t)
        if new - old < 1e-6: patience += 1
        else: patience, old = 0, new
        if patience >= 5: break
    als = C._project(P, assign, len(sds))
    return {'iterations': it, 'objective_projected': universe_objective(sds, spec, als), 'time_s': time.time() - t0}


def one(sds, spec, dev) -> dict:
    "One default c2m3 run: times, steps, objectives."
    sync(dev)
    with OtherLoad() as load, warnings.catch_warnings():
        warnings.simplefilter('ignore', ConvergenceWarning)
        t0, c0 = time.perf_counter(), time.process_time()
        r = c2m3(sds, spec, device=str(dev))
        sync(dev)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    i = r.info
    keep = ('iterations', 'stop', 'converged', 'objective_projected', 'objective', 'refine_moved', 'time_gradient_s',
            'time_step_s', 'time_assignment_s', 'time_refine_s', 'assignments')
    return {'wall_s': wall, 'cpu_s': cpu, 'other_load': load.frac, **{k: i[k] for k in keep}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='N = 2, 3 at width 512; no width sweep')
    ap.add_argument('--n', type=int, nargs='+', help='numbers of models at width 512 (default 2..10)')
    ap.add_argument('--widths', type=int, nargs='+', help='widths at N = --width-n (default 128 256 512)')
    ap.add_argument('--width-n', type=int, default=5, help='N of the width sweep')
    ap.add_argument('--ref-n', type=int, nargs='*', default=[], help="also run the reference's rule at these N")
    ap.add_argument('--threads', type=int, help='torch threads (the assignments use as many)')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--out', help='JSON file (default bench/results/c2m3_<device>[_quick].json)')
    args = ap.parse_args()
    ns = args.n or ([2, 3] if args.quick else list(range(2, 11)))
    widths = [] if args.quick else (args.widths or [128, 256, 512])
    if args.threads: torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    data = load_dataset('mnist')
    print(f"device: {device_name(dev)} ({dev}), torch threads: {torch.get_num_threads()}, load: {loadavg()}")
    print(f"commit {git_commit()}\n")
    sds, spec = models(data, 512, max(ns + args.ref_n))
    with warnings.catch_warnings():  # untimed warm-up (allocations, imports)
        warnings.simplefilter('ignore', ConvergenceWarning)
        c2m3(sds[:2], spec, max_iter=2, refine=False, device=str(dev))
    rows = []
    for w, n in [(512, n) for n in ns] + [(w, args.width_n) for w in widths]:
        ws, wspec = (sds, spec) if w == 512 else models(data, w, n)
        r = {'width': w, 'N': n, **one(ws[:n], wspec, dev)}
        if w == 512 and n in args.ref_n: r['reference_rule'] = reference_rule(ws[:n], wspec, dev)
        rows.append(r)
        print(f"  w={w} N={n}: {r['wall_s']:.1f} s, {r['iterations']} steps", file=sys.stderr)
    header = ['width', 'N', 'wall s', 'CPU s', 'FW steps (stop)', 'gradient / step / LAP / refine s',
              'f projected', 'f refined', "reference rule: steps, f projected", 'other processes']
    table = [[r['width'], r['N'], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['iterations']} ({r['stop']})",
              ' / '.join(f"{r[k]:.1f}" for k in ('time_gradient_s', 'time_step_s', 'time_assignment_s', 'time_refine_s')),
              f"{r['objective_projected']:.2f}", f"{r['objective']:.2f}",
              (f"{r['reference_rule']['iterations']}, {r['reference_rule']['objective_projected']:.2f}"
               if 'reference_rule' in r else ''), _pct(r['other_load'])] for r in rows]
    print(md_table(header, table))
    out = Path(args.out) if args.out else HERE/'results'/f"c2m3_{dev.type}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {'date': datetime.datetime.now().isoformat(timespec='seconds'), 'device': device_name(dev),
            'torch_threads': torch.get_num_threads(), 'torch': torch.__version__, 'python': platform.python_version(),
            'commit': git_commit(), 'loadavg_end': loadavg(),
            'models': 'MLP 784-w-w-w-10, MNIST, 3 epochs, seeds 0..N-1',
            'command': 'python bench/c2m3.py ' + ' '.join(sys.argv[1:]), 'out': repo_rel(out)}
    out.write_text(json.dumps({'meta': meta, 'rows': rows}, indent=1))
    print(f"\nwrote {repo_rel(out)}")


if __name__ == '__main__':
    main()
