"tps.stats: confidence intervals against independent computations, the pairing of records, what a comparison may claim, the results files."
import json, random
import numpy as np
from tps.stats import (bootstrap_interval, benchmark_summary, comparisons, forest_plot, paired, statement, t_interval,
                       write_benchmark_results)


def _rec(m, seed, draw, miou, shift=0.6):
    return {'kind': 'method', 'method': m, 'seed': seed, 'draw': draw, 'shift': shift, 'iters': 2,
            'result': {'miou': miou, 'classes': ['road'], 'iou': {'road': miou}}}


def test_t_interval_by_hand():
    "Five values: mean ± t(0.975, 4) sd / sqrt(5), the quantile from a printed t table."
    v = np.array([2.0, -1.0, 3.5, 0.5, 4.0])
    m, sd = v.sum() / 5, np.sqrt(((v - v.sum() / 5) ** 2).sum() / 4)
    half = 2.7764451 * sd / np.sqrt(5)
    assert np.allclose(t_interval(v), (m - half, m + half), atol=1e-6)
    half90 = 2.1318468 * sd / np.sqrt(5)                                # t(0.95, 4)
    assert np.allclose(t_interval(v, 0.90), (m - half90, m + half90), atol=1e-6)
    assert t_interval([1.0]) == (None, None)


def test_t_interval_matches_scipy_on_random_samples():
    from scipy import stats
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 20):
        v = rng.normal(1.0, 3.0, n)
        ref = stats.t.interval(0.95, n - 1, loc=v.mean(), scale=stats.sem(v))
        assert np.allclose(t_interval(v), ref)


def test_bootstrap_by_hand():
    "Two seeds, one draw: the resampled means are 1, 2, 3 with probabilities 1/4, 1/2, 1/4, so the 95% interval is [1, 3]."
    assert bootstrap_interval({(0, 0): 1.0, (1, 0): 3.0}) == (1.0, 3.0)
    # differences that vary only with the draw: resampling seeds alone would give a zero-width interval
    lo, hi = bootstrap_interval({(s, d): [0.0, 4.0][d] for s in range(5) for d in range(2)})
    assert (lo, hi) == (0.0, 4.0)
    assert bootstrap_interval({(0, 0): 2.0}) == (None, None)


def test_paired_matches_by_seed_and_draw_in_any_order():
    rs = [_rec('tps', s, d, 30 + 3 * s + 10 * d) for s in range(3) for d in range(2)]
    rs += [_rec('source_only', s, d, 29 + 3 * s + 10 * d + (s == 1)) for s in range(3) for d in range(2)]
    rs.append(_rec('source_only', 9, 0, 0.0))                           # no partner: left out
    random.Random(0).shuffle(rs)
    p = paired(rs, 'tps', 'source_only')
    d = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 1.0])                       # seed-major, draw-minor
    assert p['n'] == 6 and p['wins'] == 4 and p['losses'] == 0 and [u['diff'] for u in p['per_unit']] == list(d)
    assert p['mean'] == round(d.mean(), 2) and np.allclose(p['ci'], np.round(t_interval(d), 2))
    assert paired(rs, 'tps', 'davsn') is None


def test_statement_never_beats_inside_zero():
    "Random comparisons: 'beats' only when the interval excludes 0, and then for the side it lies on."
    rng = np.random.default_rng(1)
    for _ in range(300):
        n_s, n_d = rng.integers(1, 5), rng.integers(1, 3)
        eff, sd = rng.normal(0, 1), rng.uniform(0.1, 3)
        rs = [_rec('tps', s, d, 40 + eff + rng.normal(0, sd)) for s in range(n_s) for d in range(n_d)]
        rs += [_rec('pixmatch', s, d, 40.0) for s in range(n_s) for d in range(n_d)]
        p = paired(rs, 'tps', 'pixmatch')
        for key in ('ci', 'ci_bootstrap'):
            text, (lo, hi) = statement(p, key), p[key]
            if lo is None or lo <= 0 <= hi: assert text.startswith('no significant difference between TPS and PixMatch'), text
            elif lo > 0: assert text.startswith('TPS beats PixMatch by'), text
            else: assert text.startswith('PixMatch beats TPS by'), text


def test_statement_texts():
    p = {'a': 'tps', 'b': 'source_only', 'n': 10, 'mean': -2.5, 'ci': [-4.0, -1.0], 'ci_bootstrap': [-3.0, 0.5],
         'level': 0.95, 'wins': 1}
    assert statement(p).startswith('Source-only beats TPS by 2.50 mIoU [1.00, 4.00] (95% t interval, 10 pairs')
    assert statement(p, 'ci_bootstrap').startswith('no significant difference between TPS and Source-only (-2.50 mIoU [-3.00, 0.50]')


def test_summary_markdown_and_files(tmp_path):
    methods = ['source_only', 'pixmatch', 'tps', 'oracle']
    assert comparisons(methods) == [('pixmatch', 'source_only'), ('tps', 'source_only'), ('oracle', 'source_only'),
                                    ('tps', 'pixmatch'), ('tps', 'oracle')]
    rs = [{**_rec(m, s, d, 30 + i * 5 + s + d, shift), 'seconds': 2.0, 'started': 10.0 * s, 'finished': 10.0 * s + 2}
          for shift in (0.5, 1.0) for i, m in enumerate(methods) for s in range(3) for d in range(2)]
    b = benchmark_summary(rs)
    assert list(b) == ['0.5', '1'] and b['0.5']['summary']['methods']['tps']['n'] == 6 and len(b['1']['comparisons']) == 5
    w = write_benchmark_results(rs, tmp_path, extra={'title': 't'})
    doc = json.loads((tmp_path/'results.json').read_text())
    assert doc['timing']['unit_seconds'] == 2.0 * len(rs) and doc['timing']['wall_seconds'] == 22.0 and doc['machine']['torch']
    assert (tmp_path/'forest.png').stat().st_size > 1000 and w['markdown'].count('TPS beats Source-only by 10.00') == 2
    assert forest_plot(b).axes[0].get_yticks().size == 10
