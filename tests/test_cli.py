"""The command line: `modelfusion` and `python -m modelfusion`."""
import json, sys
from conftest import run, BIN

def test_help():
    for cmd in ([str(BIN/'modelfusion'), '--help'], [sys.executable, '-m', 'modelfusion', '--help']):
        r = run(cmd); assert r.returncode == 0 and 'demo' in r.stdout, r.stderr
    r = run([str(BIN/'modelfusion'), 'demo', '--help'])
    for flag in ('--dataset', '--widths', '--epochs', '--seeds', '--out'): assert flag in r.stdout

def test_demo_end_to_end(tmp_path):
    out = tmp_path/'run'
    r = run([sys.executable, '-m', 'modelfusion', 'demo', '--dataset', 'digits', '--widths', '64', '64', '--epochs', '4',
             '--lambdas', '5', '--out', str(out), '--quiet'], env={**__import__('os').environ, 'MODELFUSION_CACHE': str(tmp_path/'cache')})
    assert r.returncode == 0, r.stderr
    for row in ('model A (seed 0)', 'model B (seed 1)', 'naive midpoint', 'matched midpoint', 'loss barrier'): assert row in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ['.modelfusion-run', 'curves.csv', 'interpolation.png', 'metrics.json', 'params.json']
    m = json.loads((out/'metrics.json').read_text()); p = json.loads((out/'params.json').read_text())
    assert p['model']['widths'] == [64, 64] and p['seeds'] == [0, 1] and p['data']['name'] == 'digits'
    assert set(m['barriers']) == {'naive', 'weight matching'} and m['matches']['weight']['sweeps'] >= 1
    assert (out/'interpolation.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
