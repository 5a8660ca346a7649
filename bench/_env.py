"""What both benchmark scripts share: where the data is, what machine and commit they ran on, how busy the machine was."""
from __future__ import annotations
import os, platform, subprocess, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parent.parent


def _default_data_dir() -> None:
    "Point MODELFUSION_DATA at `../shared/data` (next to the repository) when the variable is unset and that folder holds MNIST."
    if 'MODELFUSION_DATA' in os.environ: return
    cand = ROOT.parent/'shared'/'data'
    if (cand/'mnist').is_dir(): os.environ['MODELFUSION_DATA'] = str(cand)


def repo_rel(path) -> str:
    """`path` as result files record it: relative to the repository root (`../shared/data`, `bench/results/x.json`) when it
    lies inside the repository or next to it, so that no machine's absolute path is committed; anything else as given."""
    if not path: return ''
    p = Path(os.path.abspath(Path(path).expanduser()))  # relative paths are relative to the working directory
    return os.path.relpath(p, ROOT) if p.is_relative_to(ROOT.parent) else str(path)


_default_data_dir()
os.environ.setdefault('MODELFUSION_PROGRESS', '0')


def device_name(dev: torch.device) -> str:
    if dev.type == 'cuda': return torch.cuda.get_device_name(dev)
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ('+dirty' if dirty else '') if rev else 'unknown'
    except (OSError, subprocess.SubprocessError): return 'unknown'


def loadavg() -> list[float] | None:
    "The 1/5/15-minute load averages: other processes on the machine skew CPU timings, so they are recorded."
    try: return [round(x, 2) for x in os.getloadavg()]
    except OSError: return None


def _proc_stat_busy() -> float | None:
    "Seconds of CPU time all processes on the machine have used since boot (from /proc/stat), or None off Linux."
    try:
        f = [int(v) for v in Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:]]
        return (sum(f[:8]) - f[3] - f[4]) / os.sysconf('SC_CLK_TCK')  # everything but idle and iowait (guest is in user)
    except (OSError, ValueError, IndexError): return None


class OtherLoad:
    "Measures, over a `with` block, the share of the machine's CPU capacity used by *other* processes."
    def __enter__(self):
        self.b0, self.t0, self.w0 = _proc_stat_busy(), os.times(), time.perf_counter(); return self
    def __exit__(self, *exc):
        b1, t1, w1 = _proc_stat_busy(), os.times(), time.perf_counter()
        if self.b0 is None or b1 is None: self.frac = None; return
        ours = (t1.user - self.t0.user) + (t1.system - self.t0.system)
        self.frac = max(0.0, ((b1 - self.b0) - ours) / ((os.cpu_count() or 1) * max(w1 - self.w0, 1e-9)))


def sync(dev: torch.device) -> None:
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


def _pct(x) -> str: return '?' if x is None else f"{100 * x:.0f}%"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---:' if i else '---' for i in range(len(header))) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
    return '\n'.join(lines)
