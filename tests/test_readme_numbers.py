"Every number README shows comes from a committed results file that an experiment notebook wrote: the tables verbatim, the paired differences and the speed ratios as the kit formats them."
import json
from pathlib import Path
import pytest

from tps.results import format_differences

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO/'results'
README = (REPO/'README.md').read_text()


def _json(name: str) -> dict:
    p = RESULTS/name/'results.json'
    assert p.is_file(), f"{p}: missing (README quotes it)"
    return json.loads(p.read_text())


@pytest.mark.parametrize('name, table', [('calibration', 'calibration.md'), ('demo', 'results.md'),
                                         ('gap_sweep', 'gap_sweep.md'), ('ablation', 'ablation.md')])
def test_tables_in_readme_are_the_results_files(name, table):
    text = (RESULTS/name/table).read_text().strip()
    assert text in README, f"README does not show results/{name}/{table} as written"
    assert text == _json(name)['table'].strip()                       # the .md file is the notebook's own table


def test_paired_differences_in_readme():
    lines = format_differences(_json('demo')['comparison'])
    assert lines and all(l in README for l in lines), "README's paired differences differ from results/demo/results.json"


def test_demo_records_its_seeds_protocol_and_data_seed():
    "The committed demo is `tps demo` as it runs now: its seeds, the first draw, the `sound` protocol's iterations and one lr schedule."
    from tps.experiments import DEMO_SEEDS
    from tps.harness import get_protocol
    res, sound = _json('demo'), get_protocol('sound')
    assert res['seeds'] == list(DEMO_SEEDS) and res['data']['data_seed'] == 0
    assert res['parameters']['CONTINUOUS'] is True and res['parameters']['ITERS'] == {'warmup': sound.warmup_iters, **sound.iters}
    assert _json('demo_60it')['seeds'] == [0, 1, 2] and _json('demo_60it')['parameters']['ITERS']['tps'] == 60


def _row_means(name: str) -> list:
    "The mean mIoU of each method of a demo's results (and the std when there are several seeds), as README's before/after table writes them."
    ms = _json(name)['summary']['methods']
    f = lambda v: f"{v['mean']:.2f} ± {v['std']:.2f}" if len(v['values']) > 1 else f"{v['mean']:.2f}"
    return [f(ms[m]['miou']) for m in ('source_only', 'davsn', 'pixmatch', 'tps', 'oracle')]


def test_demo_before_and_after_in_readme():
    "README's before/after rows are the 60-iteration demo's and the sound demo's results files."
    for name in ('demo_60it', 'demo'):
        d = _json(name)['comparison']['tps - source_only']
        row = ' | '.join(_row_means(name)) + f" | {d['mean']:+.2f} ({d['wins']}/{d['seeds']}) |"
        assert row in README, (name, row)


def test_ablation_checks_in_readme():
    "README says of each check of the chosen recipe (seen seeds, unseen seeds, unseen draw) what `tps.stats.statement` says of its interval, and gives every variant's paired held-out interval as the file's values make it."
    from tps.stats import statement, t_interval
    res = _json('ablation')
    assert res['protocol'] == 'sound' and set(res['check']) == {'demo', 'unseen_seeds', 'unseen_data'}
    for tag, v in res['check'].items():
        assert v['statement'] in README, (tag, v['statement'])
        assert v['statement'] == statement(v['difference'], names={res['chosen']: f"TPS {res['chosen']}"})
    for k, v in res['selection'].items():
        if k == 'tps': continue
        lo, hi = t_interval(v['diff']['values'])
        assert f"{k} {v['diff']['mean']:+.2f} [{lo:.2f}, {hi:.2f}]" in README, k


def test_speed_ratio_in_readme():
    line = next(l for l in _json('benchmark')['table'].splitlines() if l.startswith('DA-VSN / TPS'))
    assert line in README


def test_readme_figures_exist():
    import re
    for f in re.findall(r'\]\((figures/[^)]+)\)', README): assert (REPO/f).is_file(), f


def test_plus_preset_is_the_ablation_choice():
    "`TPS_PLUS` (the `*_plus` presets) is the variant the committed ablation chose on its held-out frames."
    from tps.presets import TPS_PLUS
    res = _json('ablation')
    assert res['variants'][res['chosen']] == TPS_PLUS, (res['chosen'], TPS_PLUS)


def test_cpu_roofline_in_readme():
    "README's CPU roofline block is the benchmark notebook's own table, from the line that opens it to the end."
    table = _json('benchmark')['table']
    block = table[table.index('CPU roofline'):].strip()
    assert block in README
    loop = _json('benchmark')['cpu']['loop']
    for m in ('source_only', 'tps'):                         # the training-loop speed-ups README's prose quotes
        assert f"{loop['speedup'][m]['fast']:.2f}x" in README, m


def test_sanity_check_in_readme():
    "README's sanity-check table is the sanity notebook's own table, and the split of the losses it quotes is the file's."
    res = _json('sanity')
    text = (RESULTS/'sanity'/'sanity.md').read_text().strip()
    assert text in README and text == res['table'].strip()
    s = res['split']
    assert f"{s['oracle_minus_source_only']:.2f} mIoU" in README and f"{s['statistics_share_of_source_only_loss']:.0%}" in README
    assert f"{s['pseudo_label_cost']:.2f} mIoU" in README


@pytest.mark.parametrize('name', ['sanity_sound', 'sanity_sound_lambda1', 'sanity_sound_unseen', 'sanity_sound600'])
def test_sound_protocol_sanity_in_readme(name):
    "The sound protocol's sanity tables as written, its statements, and checks (b) and (d) at shift 0 as the file has them."
    res = _json(name)
    text = (RESULTS/name/'sanity.md').read_text().strip()
    assert text in README and text == res['table'].strip()
    b = res['shift0']['tps_minus_source_only']
    assert f"{b['mean']:+.2f} ± {b['std']:.2f}" in README and f"[{b['ci'][0]:+.2f}, {b['ci'][1]:+.2f}]" in README
    assert ', '.join(f'{x:+.2f}' for x in res['shift0']['pl_acc_last_minus_first_quarter']) in README


def test_full_benchmark_in_readme():
    "README shows the full benchmark's table and says of every comparison what `tps.stats.statement` says, nothing else."
    from tps.stats import statement
    res = _json('benchmark_full')
    for shift, v in res['benchmark'].items():
        assert len(v['seeds']) >= 5 and len(v['draws']) >= 2               # the minimum: 5 seeds x 2 draws
        for p in v['comparisons']: assert statement(p) in README, statement(p)
    md = (RESULTS/'benchmark_full'/'results.md').read_text()
    table = md[md.index('| method'):md.index('\n\n', md.index('| method'))].strip()
    assert table in README
    g = res['gpu_estimate']
    assert not g['measured'] and f"{g['seconds'] / 60:.0f} min" in README


def test_joint_oracle_sanity_in_readme():
    "Check (a) from a joint oracle (source and target labels): the notebook's table as written, and that it was a joint oracle."
    res = _json('sanity_sound_joint')
    assert res['oracle_overrides'] == {'train.oracle_source': True} and res['protocol'] == 'sound'
    text = (RESULTS/'sanity_sound_joint'/'sanity.md').read_text().strip()
    assert text in README and text == res['table'].strip()


def test_held_out_curves_in_readme():
    "The held-out curves' table (plateau verdicts) as the curves notebook wrote it, on the sound protocol and every method."
    res = _json('curves')
    assert res['protocol'] == 'sound' and len(res['seeds']) >= 2
    assert set(res['methods']) == {'source_only', 'davsn', 'pixmatch', 'tps', 'oracle'}
    text = (RESULTS/'curves'/'curves.md').read_text().strip()
    assert text in README and text == res['table'].strip()


def test_gap_sweep_statements_in_readme():
    "The gap sweep runs through the harness with at least 3 seeds per shift, and README says of TPS against source-only at each shift what `tps.stats.statement` says."
    from tps.stats import statement
    res = _json('gap_sweep')
    assert res['protocol']['name'] == 'sound'
    for shift, v in res['benchmark'].items():
        assert len(v['seeds']) >= 3, shift
        p = next(p for p in v['comparisons'] if (p['a'], p['b']) == ('tps', 'source_only'))
        assert statement(p) in README, (shift, statement(p))


def test_schedule_grid_in_readme():
    "The schedule grid as grid.ipynb wrote it: its table and verdict in README, every method in every cell, and the chosen cell the rule's (plateau everywhere, then the best mean of the methods without target labels)."
    res = _json('grid')
    assert res['protocol'] == 'sound' and set(res['methods']) == {'source_only', 'davsn', 'pixmatch', 'tps', 'oracle'}
    assert res['select_by'] == ['source_only', 'davsn', 'pixmatch', 'tps'] and len(res['cells']) >= 6
    text = (RESULTS/'grid'/'grid.md').read_text().strip()
    assert text.startswith((res['table'] + '\n' + res['verdict']).strip()) and res['table'].strip() in README and res['verdict'] in README
    for c in res['cells']:
        assert c['select_score'] == pytest.approx(sum(c['end'][m] for m in res['select_by']) / 4, abs=1e-9)
    ok = [c for c in res['cells'] if all(c['plateau'].values())]
    assert res['chosen'] == (max(ok, key=lambda c: c['select_score'])['name'] if ok else None)
    conf = res['confirm']                                # the choice re-run on a new warm-up seed, paired with the cell it beat
    assert conf and len(conf['warmup_seeds']) >= 2 and conf['text'] in README and conf['text'] in text
    assert conf['holds'] == all(a > b for a, b in zip(conf['chosen'], conf['other']))
    tps_so = [c['end']['tps'] - c['end']['source_only'] for c in res['cells']]
    warm = [c['warmup_held_out'] for c in res['cells']]
    for quoted in (f"{min(tps_so):+.2f} to {max(tps_so):+.2f} mIoU", f"{min(warm):.2f} to {max(warm):.2f}",
                   f"more than {max(abs(c['select_gain']) for c in res['cells']):.2f} from", f"lead of {res['margin']:.2f}",
                   f"still ahead, by {conf['diff'][1]:+.2f}",
                   f"PixMatch is ahead of TPS in {sum(c['end']['pixmatch'] > c['end']['tps'] for c in res['cells'])} of {len(res['cells'])} cells",
                   *(f"{min(g):.1f} to {max(g):.1f}" for g in ([c['end']['oracle'] - c['warmup_held_out'] for c in res['cells'] if c['power'] == pw]
                                                              for pw in (0.9, 2.0)))):
        assert quoted in README, quoted



def test_gated_grid_in_readme():
    "The schedule grid gated by sanity check (a), as grid_sanity.ipynb wrote it: table, verdict and confirmation in README; the order the grid's, each cell's verdict recomputed from its own sanity results, the choice the first that passes."
    res, grid = _json('grid_sanity'), _json('grid')
    assert res['grid'] == 'results/grid/results.json' and res['protocol'] == grid['protocol'] == 'sound'
    assert res['order'] == [c['name'] for c in sorted(grid['cells'], key=lambda c: -c['select_score']) if all(c['plateau'].values())]
    assert res['seeds'] == [0, 1, 2] and res['oracle_overrides'] == {'train.oracle_source': True} and res['limit'] == 2.0
    assert res['checked_methods'] == ['tps', 'pixmatch'] and res['holdout'] == 48
    by = {c['name']: c for c in grid['cells']}
    for c in res['cells']:
        s = json.loads((REPO/c['results']/'results.json').read_text())
        g = by[c['name']]
        assert (s['seeds'], s['holdout'], s['oracle_overrides']) == (res['seeds'], res['holdout'], res['oracle_overrides'])
        assert s['iters'] == {'warmup': grid['warmup_iters'], 'oracle': g['iters'], 'adapt': g['iters']}
        if c['ran_here']: assert s['overrides'] == {'train.lr': g['lr'], 'train.power': g['power']}
        for m in res['methods']: assert c['minus_oracle'][m]['mean'] == s['differences'][m]['mean']
        assert c['check_a'] == all(s['differences'][m]['mean'] >= -res['limit'] for m in res['checked_methods'])
    passing = [c['name'] for c in res['cells'] if c['check_a']]
    assert res['chosen'] == (passing[0] if passing else None)
    if res['chosen'] and res['stop_at_pass']: assert res['cells'][-1]['name'] == res['chosen']
    md = (RESULTS/'grid_sanity'/'grid_sanity.md').read_text()
    assert md.startswith(res['table'] + '\n' + res['verdict']) and res['table'].strip() in README and res['verdict'] in README
    if res['confirm']:
        conf = res['confirm']
        assert conf['text'] in README and conf['text'] in md and conf['against'] == grid['protocol_cell']
        assert conf['diff'] == pytest.approx([a - b for a, b in zip(conf['chosen'], conf['other'])], abs=1e-9)
        assert conf['holds'] == (all(d > 0 for d in conf['diff']) and conf['ci'][0] is not None and conf['ci'][0] > 0)
    if res['chosen']:                                    # what README says of the choice is the file's
        c = next(c for c in res['cells'] if c['name'] == res['chosen'])
        d, b = c['minus_oracle'], res['shift0']['tps_minus_source_only']
        for quoted in (f"TPS loses {-d['tps']['mean']:.2f} [{-d['tps']['ci'][1]:.2f}, {-d['tps']['ci'][0]:.2f}]",
                       f"{-d['pixmatch']['mean']:.2f} [{-d['pixmatch']['ci'][1]:.2f}, {-d['pixmatch']['ci'][0]:.2f}] (check a)",
                       f"{b['mean']:+.2f} ± {b['std']:.2f} [{b['ci'][0]:+.2f}, {b['ci'][1]:+.2f}] mIoU (check b holds)",
                       ', '.join(f'{x:+.2f}' for x in res['shift0']['pl_acc_last_minus_first_quarter']) + ' points'):
            assert quoted in README, quoted
        assert res['shift0']['check_b'] and res['shift0']['check_d']
        if res['confirm'] and not res['confirm']['holds']:
            assert f"it is {-res['confirm']['diff'][1]:.2f} behind" in README and '**The protocol stays `sound`.**' in README
            assert f"within {max(abs(x) for x in res['confirm']['gain_diff']):.2f} of" in README

def _tps_minus_source_only(res: dict) -> str:
    "TPS minus source-only from the oracle's checkpoint, paired by seed (re-estimated statistics), as README writes it."
    from tps.stats import t_interval
    h = res['held_out']
    x = [a - b for a, b in zip(h['tps']['bn_recomputed']['values'], h['source_only']['bn_recomputed']['values'])]
    lo, hi = t_interval(x)
    return f"{sum(x) / len(x):+.2f} [{lo:+.2f}, {hi:+.2f}]"


def test_sanity_on_unseen_seeds_and_the_grid_choice_in_readme():
    "The sanity checks on unseen seeds and an unseen draw (under `sound`) and on the grid's choice (`sound_600`): what README says of check (a) is what the files say, and a protocol failing (a) is not the kit's default."
    from tps.harness import DEFAULT_PROTOCOL, get_protocol
    su, s6, sj = _json('sanity_sound_unseen'), _json('sanity_sound600'), _json('sanity_sound_joint')
    assert su['protocol'] == 'sound' and s6['protocol'] == 'sound_600' and s6['iters']['adapt'] == get_protocol('sound_600').iters['tps'] == 600
    for r in (su, s6): assert r['oracle_overrides'] == {'train.oracle_source': True}
    assert not set(su['seeds']) & set(sj['seeds']) and su['data_seed'] != sj['data_seed']     # seeds and a draw nobody chose with
    lose = lambda r, k: f"{-r['differences'][k]['mean']:.2f} [{-r['differences'][k]['ci'][1]:.2f}, {-r['differences'][k]['ci'][0]:.2f}]"
    assert f"TPS loses {lose(su, 'tps')} mIoU and PixMatch {lose(su, 'pixmatch')}: check (a) holds for both" in README
    assert all(su['differences'][k]['mean'] >= -2 for k in ('tps', 'pixmatch'))
    fails = [k for k in ('tps', 'pixmatch') if s6['differences'][k]['mean'] < -2]
    assert f"TPS loses {lose(s6, 'tps')} mIoU (check a {'fails' if 'tps' in fails else 'holds'})" in README
    for r in (su, s6, sj): assert _tps_minus_source_only(r) in README
    assert fails and DEFAULT_PROTOCOL == 'sound'                 # the grid's choice fails (a): the protocol stays sound


def test_full_benchmark_replication_in_readme():
    "The full benchmark's claims re-checked on training seeds and draws it did not use: the same protocol, disjoint seeds and draws, the replication table as `tps.stats.replication` makes it from the two files, and README's count of claims that keep their sign."
    from tps.stats import replication
    full, new = _json('benchmark_full'), _json('benchmark_unseen')
    assert full['protocol']['name'] == new['protocol']['name'] == 'sound'
    rep = new['replication']
    assert rep['of'] == 'results/benchmark_full/results.json'
    for s, v in new['benchmark'].items():
        assert not set(v['seeds']) & set(full['benchmark'][s]['seeds']) and not set(v['draws']) & set(full['benchmark'][s]['draws'])
    again = replication(full['benchmark'], new['benchmark'])
    assert rep['rows'] == again['rows'] and rep['markdown'] == again['markdown']
    assert rep['markdown'].strip() in README and (RESULTS/'benchmark_unseen'/'replication.md').read_text() == rep['markdown']
    claims = [r for r in rep['rows'] if r['claimed']]
    kept = sum(bool(r['replicates']) for r in claims)
    again_sig = sum(r['replicates'] and r['significant_new'] for r in claims)
    assert f"Of the {len(claims)} differences called significant above, **{kept} keep their sign** on the unseen seeds and draws, and {again_sig} of them" in README
    for r in claims:                                         # a claim whose new interval includes 0 is said so, in the kit's words
        if not r['significant_new']: assert f"- unseen seeds and draws: {r['statement_new']}" in README
    t = new['timing']
    assert f"{t['unit_seconds'] / 3600:.1f} h of unit time on this 2-core CPU (two invocations sharing the folder, {t['wall_seconds'] / 60:.0f} min wall)" in README
