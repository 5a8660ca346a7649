#!/usr/bin/env python
"""Merging N models: wall time of each alignment method against N (2..5) and width, with the share spent on feature
statistics versus solving (issue 10, item 8).

For each VGG11 width and each N, N randomly initialised VGG11s (no BatchNorm) are merged through `merge()` with:

* `zipit` and `cca_merge`: universe matchers; one pass over the data for all N models (`feature_moments`), then the
  greedy zipping / the CCA maps per group. Their reports split the match into `stats_s` and `solve_s`.
* `activation_matching` (Git Re-Basin): N-1 pairwise matches onto model 0, each with its own pass over the data
  (`activation_stats`, timed here by wrapping it) and one linear assignment per group.
* `weight_matching` (Git Re-Basin): N-1 pairwise coordinate descents on the weights; no data, all solving.

"apply" is the rest of the merge: mapping every model into the common space (`apply`) and averaging. The feature
cache is cleared before every merge, so every row pays for its statistics. Inputs are CIFAR-10 training images when
`$MODELFUSION_DATA` (or ../shared/data) holds them, else Gaussian noise of the same shape (the `data:` line says
which); timings do not depend on training, so the models are not trained.

    python bench/merge_many.py --threads 1             # widths x0.125, x0.25, x0.5; N = 2..5; 1000 images
    python bench/merge_many.py --quick --threads 1     # widths x0.125, x0.25; N = 2, 3; 500 images
    python bench/merge_many.py --device cuda           # statistics on the GPU (solving stays where each method runs it)

A script, never a test: it asserts nothing. It prints a markdown table and writes bench/results/merge_many_<device>.json.
"""
from __future__ import annotations
import argparse, datetime, json, os, platform, sys, time, warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _env import *  # data folder, machine/commit/load helpers shared with the other benchmarks
from _env import _pct
import torch

from modelfusion.fusion import merge
from modelfusion.models import vgg11
from modelfusion.trace import spec_for
import modelfusion.methods.activation as act
from modelfusion.methods import features

METHODS = ('zipit', 'cca_merge', 'activation_matching', 'weight_matching')


def inputs(n: int, dev: torch.device) -> tuple[torch.Tensor, str]:
    "n CIFAR-10 training images (or Gaussian noise of that shape when CIFAR-10 is not available), and what they are."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            from modelfusion.data import load_dataset
            d = load_dataset('cifar10')
        return d.x_train[:n].to(dev), f"CIFAR-10 training images ({d.source})"
    except Exception as e:
        return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev), \
               f"Gaussian noise (CIFAR-10 not found: {type(e).__name__})"


class StatsTimer:
    "Wraps activation matching's `activation_stats` to add up the seconds spent in it (restored on exit)."
    def __enter__(self):
        self.orig, self.seconds = act.activation_stats, 0.0
        def timed(*a, **k):
            t = time.perf_counter()
            try: return self.orig(*a, **k)
            finally: self.seconds += time.perf_counter() - t
        act.activation_stats = timed
        return self
    def __exit__(self, *exc): act.activation_stats = self.orig


def one(method: str, models: list, template, spec, x: torch.Tensor, dev: torch.device) -> dict:
    "Merge `models` with `method` once: total, statistics, solving and apply+average seconds."
    features._CACHE.clear()
    y = torch.zeros(len(x), dtype=torch.long, device=x.device)
    with StatsTimer() as st, OtherLoad() as load:
        sync(dev)
        t0 = time.perf_counter()
        r = merge(models, method, template=template, spec=spec, data=(x, y), n_samples=len(x))
        sync(dev)
        total = time.perf_counter() - t0
    matches = [s for s in r.report['steps'] if s['step'] == 'match']
    match_s = sum(s['time_s'] for s in matches)
    stats = sum(s['info'].get('stats_s', 0.0) for s in matches) + st.seconds
    return {'total_s': total, 'stats_s': stats, 'solve_s': match_s - stats, 'apply_s': total - match_s,
            'other_load': load.frac}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='widths x0.125, x0.25; N = 2, 3; 500 images')
    ap.add_argument('--widths', type=float, nargs='+', help='VGG11 width multipliers (default 0.125 0.25 0.5)')
    ap.add_argument('--n', type=int, nargs='+', help='numbers of models (default 2 3 4 5)')
    ap.add_argument('--samples', type=int, help='images for the statistics (default 1000)')
    ap.add_argument('--methods', nargs='+', default=list(METHODS), help='methods to time')
    ap.add_argument('--threads', type=int, help='torch threads (1 is the most robust on a shared machine)')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--out', help='JSON file (default bench/results/merge_many_<device>[_quick].json)')
    args = ap.parse_args()
    widths = args.widths or ([0.125, 0.25] if args.quick else [0.125, 0.25, 0.5])
    ns = args.n or ([2, 3] if args.quick else [2, 3, 4, 5])
    samples = args.samples or (500 if args.quick else 1000)
    if args.threads: torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    x, what = inputs(samples, dev)
    print(f"device: {device_name(dev)} ({dev}), torch threads: {torch.get_num_threads()}, load: {loadavg()}")
    print(f"data: {what}, {samples} images; commit {git_commit()}\n")
    rows, warm = [], vgg11(width=widths[0], norm=None).to(dev).eval()
    for m in args.methods:  # untimed: first calls import, trace and allocate
        one(m, [warm, warm], warm, spec_for(warm, x[:2]), x[:64], dev)
    for w in widths:
        torch.manual_seed(0)
        pool = [vgg11(width=w, norm=None).to(dev).eval() for _ in range(max(ns))]
        template = pool[0]
        spec = spec_for(template, x[:2])
        for n in ns:
            for m in args.methods:
                r = {'width': w, 'N': n, 'method': m, **one(m, pool[:n], template, spec, x, dev)}
                rows.append(r)
                print(f"  x{w:g} N={n} {m}: {r['total_s']:.2f} s", file=sys.stderr)
    header = ['VGG11 width', 'N', 'method', 'total s', 'statistics s (share)', 'solving s (share)', 'apply+average s',
              'other processes']
    table = [[f"x{r['width']:g}", r['N'], r['method'], f"{r['total_s']:.2f}",
              f"{r['stats_s']:.2f} ({_pct(r['stats_s'] / r['total_s'])})",
              f"{r['solve_s']:.2f} ({_pct(r['solve_s'] / r['total_s'])})", f"{r['apply_s']:.2f}",
              _pct(r['other_load'])] for r in rows]
    print(md_table(header, table))
    out = Path(args.out) if args.out else HERE/'results'/f"merge_many_{dev.type}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {'date': datetime.datetime.now().isoformat(timespec='seconds'), 'device': device_name(dev),
            'torch_threads': torch.get_num_threads(), 'torch': torch.__version__, 'python': platform.python_version(),
            'commit': git_commit(), 'loadavg_end': loadavg(), 'data': what, 'samples': samples,
            'command': 'python bench/merge_many.py ' + ' '.join(sys.argv[1:]), 'out': repo_rel(out)}
    out.write_text(json.dumps({'meta': meta, 'rows': rows}, indent=1))
    print(f"\nwrote {repo_rel(out)}")


if __name__ == '__main__':
    main()
