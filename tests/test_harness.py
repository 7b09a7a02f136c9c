"tps.harness: a killed benchmark resumes to the records of an uninterrupted one, two invocations share a folder without doing a unit twice, claims of dead processes are taken over and live ones respected."
import json, os, signal, subprocess, sys, threading, time
from pathlib import Path
import pytest
from tps.harness import HOST, _proc_start, main, plan, read_records, record_content, run_benchmark, try_claim, CLAIM_STALE_S

REPO = Path(__file__).resolve().parents[1]
ARGS = ['--protocol', 'smoke', '--methods', 'source_only', 'tps', '--seeds', '2', '--data-seeds', '0', '--poll', '0.1']


def _harness(out, *extra, **kw):
    "A `python -m tps.harness` process on `out` with this checkout's package."
    env = {**os.environ, 'PYTHONPATH': f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", 'OMP_NUM_THREADS': '1'}
    return subprocess.Popen([sys.executable, '-m', 'tps.harness', *ARGS, '--out', str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _contents(out) -> dict:
    return {r['key']: record_content(r) for r in read_records(out)}


def _finished_events(out) -> list:
    return [e for e in map(json.loads, (Path(out)/'harness.log').read_text().splitlines()) if e['event'] == 'finished']


@pytest.mark.slow
def test_killed_benchmark_resumes_to_the_same_records(tmp_path):
    ref, out = tmp_path/'ref', tmp_path/'out'
    _finish(_harness(ref))
    proc = _harness(out)
    rec_dir, t0 = out/'records', time.time()
    while not list(rec_dir.glob('warmup_*.json')):                       # the first training's record
        assert proc.poll() is None and time.time() - t0 < 180, 'the benchmark ended before its first warm-up record'
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.communicate()
    n_killed = len(list(rec_dir.glob('*.json')))
    assert 2 <= n_killed < 7, f'the kill should land mid-benchmark ({n_killed} of 7 records)'
    _finish(_harness(out))
    got, want = _contents(out), _contents(ref)
    assert len(want) == 7 and got == want
    assert not list((out/'claims').iterdir())                            # the dead run's claim was taken over and released


@pytest.mark.slow
def test_two_invocations_share_a_folder(tmp_path):
    out = tmp_path/'out'
    a = _harness(out, '--data-seeds', '0', '1')
    b = _harness(out, '--data-seeds', '0', '1')
    logs = _finish(a) + _finish(b)
    units = plan('smoke', ['source_only', 'tps'], range(2), (0, 1), data_root=out/'data')
    assert len(units) == 14 and {r['key'] for r in read_records(out)} == {u.key for u in units}
    done = [e['unit'] for e in _finished_events(out)]
    assert sorted(done) == sorted(u.key for u in units), 'every unit finished exactly once'
    trained = sorted(p.parent.relative_to(out/'runs').parent for p in (out/'runs').glob('*/*/*/done.json'))
    assert len(trained) == 12 and len(set(trained)) == 12, 'every training ran exactly once'
    print('units per process:', {pid: sum(e['pid'] == pid for e in _finished_events(out)) for pid in (a.pid, b.pid)})
    assert 'Benchmark: protocol smoke' in logs


def test_claims_dead_taken_over_live_respected(tmp_path):
    "The data unit held by a live process blocks everything; once that process dies its claim is taken over."
    out = tmp_path/'out'
    units = plan('smoke', ['tps'], [0], [0], data_root=out/'data')
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    try:
        claims = out/'claims'; claims.mkdir(parents=True)
        (claims/f'{units[0].key}.claim.0').write_text(json.dumps({**HOST, 'pid': holder.pid, 'pid_start': _proc_start(holder.pid),
                                                                   'started': time.time()}))
        t = threading.Thread(target=run_benchmark, kwargs=dict(protocol='smoke', methods=['tps'], seeds=[0], draws=[0],
                                                               out=out, poll=0.1, log=lambda *a, **k: None))
        t.start()
        time.sleep(3)
        assert t.is_alive() and not list((out/'records').glob('*.json')), 'a live claim must be respected'
        holder.kill(); holder.wait()
        t.join(timeout=120)
        assert not t.is_alive() and len(read_records(out)) == 3
        claimed = [e for e in map(json.loads, (out/'harness.log').read_text().splitlines()) if e['event'] == 'claimed']
        assert claimed[0]['unit'] == units[0].key and claimed[0]['took_over'][0]['pid'] == holder.pid
    finally:
        if holder.poll() is None: holder.kill(); holder.wait()


def test_claim_rules(tmp_path):
    c = try_claim(tmp_path, 'u')
    assert c is not None and try_claim(tmp_path, 'u') is None             # this process holds it
    c.release()
    assert not list(tmp_path.iterdir())
    p = tmp_path/'u.claim.0'
    p.write_text(json.dumps({**HOST, 'pid': os.getpid(), 'pid_start': 1, 'started': 0}))   # our pid, another process's start
    c = try_claim(tmp_path, 'u'); assert c is not None and c.path.name == 'u.claim.1'; c.release()
    p.write_text(json.dumps({'host': 'other', 'boot_id': 'x', 'pid': os.getpid(), 'started': 0}))
    assert try_claim(tmp_path, 'u') is None                               # another host, recent heartbeat
    os.utime(p, (time.time() - CLAIM_STALE_S - 1,) * 2)
    c = try_claim(tmp_path, 'u'); assert c is not None and not p.exists(); c.release()
    p.write_text('')                                                      # being written by someone right now
    assert try_claim(tmp_path, 'u') is None


def test_plan_lists_done_and_open(tmp_path, capsys):
    out = tmp_path/'out'
    run_benchmark('smoke', ['source_only'], [0], [0], out=out, log=lambda *a, **k: None)
    assert main(['--protocol', 'smoke', '--methods', 'source_only', 'tps', '--seeds', '1', '--data-seeds', '0',
                 '--out', str(out), '--plan']) == 0
    lines = capsys.readouterr().out.split('\n')
    assert [l.split()[0] for l in lines if l] == ['done', 'done', 'done', 'open']
    assert main(['--protocol', 'smoke', '--methods', 'source_only', '--seeds', '2', '--first-seed', '3', '--data-seeds', '0',
                 '--out', str(out), '--plan']) == 0                 # seeds 3 and 4: their own units, open; the draw is done
    keys = [l.split()[1] for l in capsys.readouterr().out.split('\n') if l]
    assert keys == [u.key for u in plan('smoke', ['source_only'], [3, 4], [0], data_root=out/'data')]
    assert main(['--protocol', 'nope', '--out', str(out), '--plan']) == 2
    assert "unknown protocol 'nope'" in capsys.readouterr().err


def test_benchmark_full_notebook(tmp_path, repo):
    "The papermill notebook with the lead's kind of parameters (smoke-sized): results.json, results.md and the forest plot."
    pm = pytest.importorskip('papermill')
    out, res = tmp_path/'out', tmp_path/'results'
    pm.execute_notebook(str(repo/'nbs/experiments/benchmark_full.ipynb'), str(tmp_path/'benchmark_full.ipynb'),
                        parameters={'PROTOCOL': 'smoke', 'METHODS': ['source_only', 'pixmatch'], 'SEEDS': 1, 'DRAWS': [0, 1],
                                    'OUT': str(out), 'RESULTS_DIR': str(res), 'POLL': 0.1},
                        cwd=str(repo), kernel_name='python3', language='python', progress_bar=False)
    doc = json.loads((res/'results.json').read_text())
    comp = doc['benchmark']['0.6']['comparisons']
    assert [(c['a'], c['b'], c['n']) for c in comp] == [('pixmatch', 'source_only', 2)]
    assert doc['protocol']['name'] == 'smoke' and len(doc['records']) == 2 + 2 + 4 and doc['machine']['cpu'] is not None
    assert 'PixMatch - Source-only' in (res/'results.md').read_text() and (res/'forest.png').stat().st_size > 1000
    g = doc['gpu_estimate']                      # the GPU estimate: each run's iterations at its method's per-iteration floor
    per = {m: v['s'] for m, v in g['per_iteration'].items()}
    assert not g['measured'] and abs(g['train_seconds'] - 2 * 2 * (per['warmup'] + per['source_only'] + per['pixmatch'])) < 1
    assert g['per_iteration']['pixmatch']['flops'] > g['per_iteration']['source_only']['flops'] > 0
    assert abs(g['seconds'] - g['train_seconds'] - g['eval_seconds'] - g['data_seconds_cpu']) <= 2
    res2 = tmp_path/'results_new'                # other seeds and another draw re-check its comparisons (REPLICATES)
    pm.execute_notebook(str(repo/'nbs/experiments/benchmark_full.ipynb'), str(tmp_path/'benchmark_full_new.ipynb'),
                        parameters={'PROTOCOL': 'smoke', 'METHODS': ['source_only', 'pixmatch'], 'SEEDS': [3], 'DRAWS': [2],
                                    'OUT': str(out), 'RESULTS_DIR': str(res2), 'POLL': 0.1, 'REPLICATES': str(res/'results.json')},
                        cwd=str(repo), kernel_name='python3', language='python', progress_bar=False)
    new = json.loads((res2/'results.json').read_text())
    assert {r['seed'] for r in new['records'] if r['kind'] == 'method'} == {3} and new['benchmark']['0.6']['draws'] == [2]
    from tps.stats import replication
    rep = new['replication']
    assert rep['of'] == str(res/'results.json') and rep['rows'] == replication(doc['benchmark'], new['benchmark'])['rows']
    assert [(r['a'], r['b'], r['new']['n']) for r in rep['rows']] == [('pixmatch', 'source_only', 1)]
    assert (res2/'replication.md').read_text() == rep['markdown'] and 'PixMatch - Source-only' in rep['markdown']


def test_interrupted_data_generation_is_redone(tmp_path):
    "A draw whose generation was killed (a folder without its synthetic.json) is written again by whoever claims its unit."
    from tps.harness import data_dir
    out = tmp_path/'out'
    partial = data_dir(out/'data', 'smoke', 0, 0.6)
    (partial/'viper'/'train').mkdir(parents=True)
    (partial/'viper'/'train'/'junk.jpg').write_bytes(b'not an image')
    recs = run_benchmark('smoke', ['source_only'], [0], [0], out=out, log=lambda *a, **k: None)
    assert [r['kind'] for r in recs] == ['data', 'warmup', 'method'] and (partial/'synthetic.json').exists()
    assert not (partial/'viper'/'train'/'junk.jpg').exists() and recs[2]['result']['miou'] >= 0


def test_unit_keys_of_the_committed_benchmark_are_reproduced():
    "A key added to the config later (`LATER_KEYS`) at its default leaves every unit key as it was: the plan of the committed full benchmark names its records."
    from tps.harness import plan, portable_config, LATER_KEYS
    from tps.presets import get_preset
    doc = json.loads((Path(__file__).resolve().parents[1]/'results'/'benchmark_full'/'results.json').read_text())
    committed = {r['key'] for r in doc['records']}
    keys = {u.key for u in plan('sound', seeds=range(5), draws=(0, 1), shifts=[0.6], data_root='/anywhere')}
    assert committed and committed == keys
    c = get_preset('smoke')
    assert not set(LATER_KEYS) & {f'{s}.{k}' for s, v in portable_config(c).items() if isinstance(v, dict) for k in v}
    c.train.oracle_source = True                         # set, it is part of the key
    assert portable_config(c)['train']['oracle_source'] is True
