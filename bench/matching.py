#!/usr/bin/env python
"""Weight matching benchmark: modelfusion's Git Re-Basin weight matching against the PyPI package `rebasin`.

Both tools solve the same problem on the same pair of models, in the same process: find permutations of model B's
hidden units that maximise Σ_p <W_A[p], π(W_B)[p]> by coordinate descent over the permutation groups, one
linear assignment (scipy's `linear_sum_assignment`) per group visit. For each case and tool the script records the
wall time, sweeps, assignment solves (and the time spent inside them), the final objective computed one way for both,
and whether the permuted B still computes the same function as B.

    pip install rebasin==0.0.47 torchview graphviz    # the competitor (not a modelfusion dependency)
    python bench/matching.py --threads 1              # full run (MLP 512..4096, ResNet20 x1..x16): ~7.5 min, most of it rebasin
    python bench/matching.py --quick --threads 1      # MLP 512, 1024 and ResNet20 x1, x2: ~30 s
    python bench/matching.py --device cuda            # cost matrices on the GPU (the assignments stay on the CPU)

This is a script, never a test: nothing here asserts anything. See bench/README.md for how to read the output.
"""
from __future__ import annotations
import argparse, datetime, json, os, platform, shlex, subprocess, sys, time, traceback, warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


from _env import *  # data folder, machine/commit/load helpers shared with the other benchmark
from _env import _pct, _proc_stat_busy
import numpy as np
import scipy
import torch

import modelfusion.methods.weight_matching as mf_matching
from modelfusion.core import is_stat
from modelfusion.models import MLP, ResNet20
from modelfusion.spec import apply
from modelfusion.trace import spec_for
from modelfusion.methods.weight_matching import weight_matching


# ----------------------------------------------------------------------------------------------------------------------
# environment

class LSACounter:
    "Replaces `module.linear_sum_assignment` (the name a module imported from scipy) by a wrapper that counts calls "
    "and the seconds spent inside them; restores the original on exit."
    def __init__(self, module):
        self.module, self.calls, self.seconds, self.sizes = module, 0, 0.0, []
    def __enter__(self):
        self.orig = orig = self.module.linear_sum_assignment
        def counted(*a, **kw):
            t0 = time.perf_counter()
            try: return orig(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0; self.calls += 1
                self.sizes.append(int(np.shape(a[0])[0]) if a else -1)
        self.module.linear_sum_assignment = counted
        return self
    def __exit__(self, *exc): self.module.linear_sum_assignment = self.orig


# ----------------------------------------------------------------------------------------------------------------------
# cases

class Case:
    "Two models of one architecture (A is the reference, B gets permuted) and an input batch for both tools."
    def __init__(self, name: str, family: str, make, sd_a: dict, sd_b: dict, x: torch.Tensor, extra: dict | None = None):
        self.name, self.family, self.make, self.sd_a, self.sd_b, self.x = name, family, make, sd_a, sd_b, x
        self.extra = extra or {}
    def models(self, dev) -> tuple[torch.nn.Module, torch.nn.Module]:
        "Fresh modules holding A's and B's weights, in eval mode, on `dev`."
        out = []
        for sd in (self.sd_a, self.sd_b):
            m = self.make(); m.load_state_dict(sd); out.append(m.to(dev).eval())
        return out[0], out[1]


def _seeded(make, seed: int) -> dict:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in make().state_dict().items()}


def randomise_bn_stats(sd: dict, seed: int) -> dict:
    "BatchNorm running statistics as a trained model has them (not the 0/1 of a fresh model), so that a matcher "
    "which forgets to permute them produces a model that computes a different function."
    g = torch.Generator().manual_seed(seed); sd = dict(sd)
    for k, v in sd.items():
        if k.endswith('running_mean'): sd[k] = 0.5 * torch.randn(v.shape, generator=g)
        elif k.endswith('running_var'): sd[k] = 0.5 + torch.rand(v.shape, generator=g)
    return sd


def mlp_case(w: int, seeds=(0, 1)) -> Case:
    make = lambda: MLP(784, (w,) * 3, 10)
    x = torch.randn(64, 784, generator=torch.Generator().manual_seed(123))
    return Case(f'MLP 784-{w}x3-10, init', 'mlp', make, _seeded(make, seeds[0]), _seeded(make, seeds[1]), x,
                {'width': w, 'models': 'init'})


def mlp_trained_case(w: int, data, epochs: int, log) -> Case:
    from modelfusion.training import train, TrainConfig, model_config
    cfg = TrainConfig(epochs=epochs, batch_size=128, amp=False)  # the configuration bench_foundation.py trains (shared cache)
    sds, accs, cached = [], [], []
    for s in (0, 1):
        t0 = time.perf_counter()
        tr = train(model_config('mlp', data, widths=[w] * 3), data, cfg, seed=s, device='cpu', verbose=False)
        sds.append(tr.state_dict); accs.append(tr.meta['metrics']['test_acc']); cached.append(tr.from_cache)
        log(f"  trained MLP w={w} seed {s}: test acc {accs[-1]:.4f} ({'cache' if tr.from_cache else f'{time.perf_counter() - t0:.0f}s'})")
    make = lambda: MLP(784, (w,) * 3, 10)
    return Case(f'MLP 784-{w}x3-10, trained {epochs} ep', 'mlp', make, sds[0], sds[1], data.x_test[:64].float(),
                {'width': w, 'models': f'trained {epochs} ep MNIST', 'test_acc': accs, 'from_cache': cached})


def resnet_case(width: float, norm: str, bn_stats: bool = False) -> Case:
    make = lambda: ResNet20(width=width, norm=norm)
    a, b = _seeded(make, 0), _seeded(make, 1)
    if bn_stats: a, b = randomise_bn_stats(a, 10), randomise_bn_stats(b, 11)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(123))
    label = {'ln': 'LN (GroupNorm(1,c))', 'bn': 'BN'}[norm]
    return Case(f'ResNet20 x{width:g} {label}, init' + (', BN stats set' if bn_stats else ''), 'resnet20', make, a, b, x,
                {'width': width, 'norm': norm, 'models': 'init' + (' + BN running stats set' if bn_stats else '')})


# ----------------------------------------------------------------------------------------------------------------------
# measurement

def objective(sd_a: dict, sd_b: dict, params: list[str]) -> float:
    "Σ_p <A[p], B[p]> in float64 over `params`: the weight-matching objective, computed the same way for both tools."
    return float(sum((sd_a[p].detach().cpu().double() * sd_b[p].detach().cpu().double()).sum() for p in params))


@torch.no_grad()
def equivalent(model: torch.nn.Module, sd_new: dict, x: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    "Whether `model` with weights `sd_new` gives `ref` on x (eval mode), and the largest absolute difference."
    out = torch.func.functional_call(model, {k: v.to(x.device) for k, v in sd_new.items()}, (x,))
    err = float((out - ref).abs().max())
    return bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))), err


def run_modelfusion(case: Case, dev: torch.device, params: list[str] | None = None) -> dict:
    "spec_for (trace) + weight_matching with default settings; everything from spec derivation to alignment timed."
    model_a, model_b = case.models('cpu')
    with torch.no_grad(): ref = model_b(case.x)
    with OtherLoad() as ol, LSACounter(mf_matching) as lsa:
        sync(dev); t0 = time.perf_counter()
        spec = spec_for(model_a, case.x)
        t1 = time.perf_counter()
        res = weight_matching([case.sd_a, case.sd_b], spec, device=str(dev))
        sync(dev); t2 = time.perf_counter()
    al = res.alignments[1]
    params = params or [p for p in spec.by_param() if not is_stat(p)]
    sd_b_new = apply(case.sd_b, spec, al)
    ok, err = equivalent(model_b, sd_b_new, case.x, ref)
    info = res.info
    return {'setup_s': t1 - t0, 'match_s': t2 - t1, 'total_s': t2 - t0, 'lsa_s': lsa.seconds, 'solves': lsa.calls,
            'solves_reported': info.get('solves'), 'sweeps': info.get('sweeps'), 'converged': info.get('converged'),
            'groups': len(spec.groups), 'group_sizes': [g.size for g in spec.groups.values()],
            'objective': objective(case.sd_a, sd_b_new, params), 'objective_reported': info.get('objective'),
            'objective_identity': objective(case.sd_a, case.sd_b, params), 'equivalent': ok, 'max_abs_diff': err,
            'objective_trace': [float(v) for v in info.get('objective_trace', [])],  # after each sweep (newer modelfusion)
            'other_load': ol.frac}, params


def run_rebasin(case: Case, dev: torch.device, params: list[str], max_iterations: int, seed: int = 0) -> dict:
    "rebasin's PermutationCoordinateDescent(model_a, model_b, x).rebasin(max_iterations): graph tracing + descent, timed."
    import rebasin.permutation_coordinate_descent as rb_pcd
    from rebasin import PermutationCoordinateDescent
    model_a, model_b = case.models(dev)
    x = case.x.to(dev)
    with torch.no_grad(): ref = model_b(x)
    steps = [0]
    with OtherLoad() as ol, LSACounter(rb_pcd) as lsa:
        sync(dev); t0 = time.perf_counter()
        kw = {'device_a': dev, 'device_b': dev} if dev.type == 'cuda' else {}
        pcd = PermutationCoordinateDescent(model_a, model_b, x, **kw)
        t1 = time.perf_counter()
        step = pcd._calculate_permutations_step
        def counted_step(*a, **k):
            steps[0] += 1; return step(*a, **k)
        pcd._calculate_permutations_step = counted_step
        torch.manual_seed(seed)  # rebasin draws its group order from torch's global generator
        pcd.rebasin(max_iterations=max_iterations)
        sync(dev); t2 = time.perf_counter()
    perms = pcd.pinit.model_graph.permutation_to_info
    # rebasin's cost matrix of a permutation is the sum of w_a @ w_b.T over its PermutationInfos: count them, the
    # distinct (tensor, axis) pairs among them, and those on 1-D tensors (biases, norm weights), whose product is a
    # scalar added to every entry, i.e. a term that cannot influence the assignment
    infos = [i for _, inf in perms for i in inf]
    terms = {'cost_terms': len(infos), 'cost_terms_distinct': len({(id(i.parameter_b), i.axis) for i in infos}),
             'cost_terms_1d': sum(i.parameter_b.ndim == 1 for i in infos)}
    sd_b_new = {k: v.detach().cpu() for k, v in model_b.state_dict().items()}
    ok, err = equivalent(case.models(dev)[1], sd_b_new, x, ref)
    return {'setup_s': t1 - t0, 'match_s': t2 - t1, 'total_s': t2 - t0, 'lsa_s': lsa.seconds, 'solves': lsa.calls,
            'sweeps': steps[0], 'converged': steps[0] < max_iterations, 'groups': len(perms),
            'group_sizes': [len(p.perm_indices) for p, _ in perms], **terms,
            'objective': objective(case.sd_a, sd_b_new, params), 'equivalent': ok, 'max_abs_diff': err,
            'other_load': ol.frac}


def measure(case: Case, dev: torch.device, args, log) -> dict:
    row = {'case': case.name, 'family': case.family, **case.extra}
    params = None
    for tool in args.tools:
        best = None
        for r in range(args.repeats):
            try:
                if tool == 'modelfusion': res, params = run_modelfusion(case, dev)
                else:
                    if params is None:  # the objective's parameter set comes from modelfusion's spec
                        params = [p for p in spec_for(case.models('cpu')[0], case.x).by_param() if not is_stat(p)]
                    res = run_rebasin(case, dev, params, args.max_iterations)
            except Exception as e:
                res = {'error': f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}",
                       'traceback': traceback.format_exc(limit=6)}
                log(f"  {tool} FAILED on {case.name}: {res['error']}")
                best = res; break
            if best is None or res['total_s'] < best['total_s']: best = res
        row[tool] = best
        if 'error' not in best:
            log(f"  {tool:11s} {case.name}: {best['total_s']:.2f}s (setup {best['setup_s']:.2f}, lsa {best['lsa_s']:.2f}), "
                f"{best['sweeps']} sweeps, {best['solves']} solves, objective {best['objective']:.4f}, "
                f"equivalent {best['equivalent']}, other load {_pct(best['other_load'])}")
    mf, rb = row.get('modelfusion', {}), row.get('rebasin', {})
    if mf and rb and 'error' not in mf and 'error' not in rb:
        row['speedup'] = rb['total_s'] / mf['total_s']
        row['speedup_match_only'] = rb['match_s'] / mf['match_s']
        row['objective_rel_diff'] = (mf['objective'] - rb['objective']) / max(abs(rb['objective']), 1e-12)
        # the objective includes terms no permutation changes (e.g. norm weights that start at 1), which dilutes the
        # relative difference: also compare the gains over the identity
        ident = mf['objective_identity']
        row['gain_ratio'] = (mf['objective'] - ident) / (rb['objective'] - ident) if rb['objective'] != ident else None
    return row


# ----------------------------------------------------------------------------------------------------------------------
# output

def _tool_cells(r: dict) -> list[str]:
    if not r: return ['-'] * 5
    if 'error' in r: return ['FAILED', '-', '-', '-', '-']
    eq = 'yes' if r['equivalent'] else f"**NO** (max diff {r['max_abs_diff']:.2g})"
    return [f"{r['total_s']:.2f} ({r['setup_s']:.2f} + {r['match_s']:.2f})", f"{r['sweeps']}{'' if r['converged'] else ' (cap)'}",
            f"{r['solves']} ({r['lsa_s']:.2f}s)", f"{r['objective']:.3f}", eq]


def render(meta: dict, rows: list[dict]) -> str:
    out = [f"Weight matching, modelfusion vs rebasin {meta['rebasin']}, {meta['date']}",
           f"device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, {meta['threads']} threads, "
           f"numpy {meta['numpy']}, scipy {meta['scipy']}, python {meta['python']}, commit {meta['commit']}",
           f"command: {meta['command']}",
           f"load average (1/5/15 min) at start {meta['loadavg_start']}, at end {meta.get('loadavg_end')}; total {meta.get('total_s', 0):.0f}s", '',
           "time = setup (modelfusion: spec_for; rebasin: PermutationCoordinateDescent(...), torchview tracing) + matching; "
           "solves = calls of scipy's linear_sum_assignment (seconds inside them); objective = Σ_p <W_A[p], π(W_B)[p]> over the "
           "weights the modelfusion spec touches (float64, same code for both); equiv = permuted B computes B's function "
           "(eval mode, allclose on a batch); speed-up = rb time / mf time (setup + match); "
           "objective mf vs rb = (mf - rb) / |rb|; gain = objective - identity objective.", '']
    table = []
    for r in rows:
        mf, rb = r.get('modelfusion', {}), r.get('rebasin', {})
        ident = next((t['objective_identity'] for t in (mf, rb) if t and 'objective_identity' in t), None)
        table.append([r['case'], f"{ident:.3f}" if ident is not None else '-', *_tool_cells(mf), *_tool_cells(rb),
                      f"{r['speedup']:.2f}x" if 'speedup' in r else '-',
                      f"{100 * r['objective_rel_diff']:+.2f}%" if 'objective_rel_diff' in r else '-',
                      f"{r['gain_ratio']:.3f}" if r.get('gain_ratio') is not None else '-',
                      f"{mf.get('groups', '-')} / {rb.get('groups', '-')}",
                      f"{_pct(mf.get('other_load'))} / {_pct(rb.get('other_load'))}"])
    out.append(md_table(['case', 'identity obj.', 'mf time s (setup + match)', 'mf sweeps', 'mf solves (LSA s)', 'mf objective', 'mf equiv',
                         'rb time s (setup + match)', 'rb iterations', 'rb solves (LSA s)', 'rb objective', 'rb equiv',
                         'speed-up rb/mf', 'objective mf vs rb', 'gain mf / gain rb', 'groups mf / rb', 'other CPU load mf / rb'], table))
    fails = [(r['case'], t, r[t]['error']) for r in rows for t in ('modelfusion', 'rebasin') if r.get(t) and 'error' in r[t]]
    if fails:
        out += ['', 'Failures:'] + [f"- {t} on {c}: {e}" for c, t, e in fails]
    return '\n'.join(out) + '\n'


def write_out(path: Path, meta: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps({'meta': meta, 'rows': rows}, indent=2) + '\n')
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------

def warm_up(dev, args, log) -> None:
    "Both tools once on tiny models (imports, thread pools, torchview/fx tracing code paths), results discarded."
    for case in (mlp_case(32), resnet_case(0.25, args.norm)):
        for tool in args.tools:
            try:
                if tool == 'modelfusion': run_modelfusion(case, dev)
                else:
                    params = [p for p in spec_for(case.models('cpu')[0], case.x).by_param() if not is_stat(p)]
                    run_rebasin(case, dev, params, args.max_iterations)
            except Exception as e: log(f"  warm-up: {tool} failed on {case.name}: {type(e).__name__}: {e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (rebasin gets the models on this device)")
    p.add_argument('--quick', action='store_true', help='MLP widths 512, 1024 (init and trained) and ResNet20 x1, x2 only')
    p.add_argument('--mlp-widths', type=int, nargs='*', default=None, help='MLP hidden widths, random init (default 512 1024 2048 4096)')
    p.add_argument('--trained-widths', type=int, nargs='*', default=None, help='MLP widths also matched after training on MNIST (default 512 1024)')
    p.add_argument('--train-epochs', type=int, default=2)
    p.add_argument('--resnet-widths', type=float, nargs='*', default=None, help='ResNet20 width multipliers (default 1 2 4 8 16)')
    p.add_argument('--norm', default='ln', choices=['ln', 'bn'], help='norm of the ResNet20 rows')
    p.add_argument('--bn-widths', type=float, nargs='*', default=None,
                   help="ResNet20 widths also run with norm='bn' and non-trivial BN running statistics (default 1 2)")
    p.add_argument('--tools', nargs='+', default=['modelfusion', 'rebasin'], choices=['modelfusion', 'rebasin'])
    p.add_argument('--max-iterations', type=int, default=100, help="rebasin's max_iterations")
    p.add_argument('--repeats', type=int, default=1, help='timed runs per case and tool; the fastest is reported')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: leave as is)')
    p.add_argument('--out', default=None, help="JSON results (default bench/results/matching_<device>[_quick].json; '' for none)")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == 'cuda' and not torch.cuda.is_available(): p.error('--device cuda but CUDA is not available')
    if args.threads: torch.set_num_threads(args.threads)
    q = args.quick
    if args.mlp_widths is None: args.mlp_widths = [512, 1024] if q else [512, 1024, 2048, 4096]
    if args.trained_widths is None: args.trained_widths = [512, 1024]
    if args.resnet_widths is None: args.resnet_widths = [1, 2] if q else [1, 2, 4, 8, 16]
    if args.bn_widths is None: args.bn_widths = [1] if q else [1, 2]
    if args.out is None: args.out = str(HERE/'results'/f"matching_{dev.type}{'_quick' if q else ''}.json")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    try:
        from importlib.metadata import version
        rb_version = version('rebasin')
    except Exception: rb_version = 'not installed'
    if 'rebasin' in args.tools and rb_version == 'not installed':
        p.error("rebasin is not installed: pip install rebasin==0.0.47 torchview graphviz (or pass --tools modelfusion)")

    meta = {'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'command': shlex.join(['python', 'bench/matching.py'] + (argv if argv is not None else sys.argv[1:])),
            'device': str(dev), 'device_name': device_name(dev), 'cpu_count': os.cpu_count(), 'torch': torch.__version__,
            'threads': torch.get_num_threads(), 'numpy': np.__version__, 'scipy': scipy.__version__, 'rebasin': rb_version,
            'python': platform.python_version(), 'commit': git_commit(), 'args': {**vars(args), 'out': repo_rel(args.out)}, 'loadavg_start': loadavg(),
            'MODELFUSION_DATA': repo_rel(os.environ.get('MODELFUSION_DATA', ''))}
    t_start = time.perf_counter()
    log(f"device {dev} ({meta['device_name']}), {meta['threads']} threads, rebasin {rb_version}; warming up")
    warm_up(dev, args, log)

    cases = [lambda w=w: mlp_case(w) for w in args.mlp_widths]
    if args.trained_widths:
        from modelfusion.data import load_dataset
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always'); data = load_dataset('mnist', allow_sample=True, device='cpu')
        for w in caught: log(f"warning: {w.message}")
        meta['data'] = f"{data.source}: {len(data.x_train)} train / {len(data.x_test)} test"
        cases += [lambda w=w: mlp_trained_case(w, data, args.train_epochs, log) for w in args.trained_widths]
    cases += [lambda w=w: resnet_case(w, args.norm) for w in args.resnet_widths]
    cases += [lambda w=w: resnet_case(w, 'bn', bn_stats=True) for w in args.bn_widths]

    rows = []
    for make_case in cases:
        case = make_case()
        log(f"{case.name}")
        rows.append(measure(case, dev, args, log))
        meta['total_s'] = time.perf_counter() - t_start; meta['loadavg_end'] = loadavg()
        if args.out: write_out(Path(args.out), meta, rows)  # partial results survive an interrupted run
    print(render(meta, rows))
    if args.out: log(f"wrote {args.out}")


if __name__ == '__main__':
    main()
