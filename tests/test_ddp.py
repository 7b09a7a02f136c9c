"DDP: two CPU processes (gloo) launched by torchrun train a few iterations; the replicas end with identical weights."
import os, subprocess, sys, textwrap
import pytest
import torch

from tps.config import save_config

_SCRIPT = textwrap.dedent('''
    import os, sys, torch
    import tps.train as T
    from tps.config import load_config
    cfg, run, out = load_config(sys.argv[1]), sys.argv[2], sys.argv[3]
    nets = []
    build = T.build_model
    def capture(mc):
        net = build(mc); nets.append(net); return net
    T.build_model = capture
    T.train(cfg, run_dir=run)
    torch.save({k: v.clone() for k, v in nets[0].state_dict().items()}, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
''')


def test_ddp_replicas_identical(smoke_config, tmp_path):
    from tps.train import list_checkpoints, load_training_checkpoint
    cfg = smoke_config('tps', iters=3, save_every=3)
    cpath = tmp_path/'cfg.yaml'; save_config(cfg, cpath)
    script = tmp_path/'ddp_train.py'; script.write_text(_SCRIPT)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(script), str(cpath), str(tmp_path/'run'), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    w0, w1 = (torch.load(tmp_path/f'rank{i}.pt') for i in (0, 1))
    params = [k for k in w0 if 'running' not in k and 'num_batches' not in k]
    diff = [k for k in params if not torch.equal(w0[k], w1[k])]
    assert not diff, f"replicas differ: {diff[:5]}"
    ck = load_training_checkpoint(tmp_path/'run')           # written once, by rank 0, with both ranks' RNG states
    assert [p.name for p in list_checkpoints(tmp_path/'run')] == ['iter_0000003.pth']
    assert ck['world_size'] == 2 and len(ck['rng']) == 2 and ck['rng'][0]['data']['tgt'] == ck['rng'][1]['data']['tgt']
    assert not torch.equal(ck['rng'][0]['generator'], ck['rng'][1]['generator'])  # ranks augment differently
    assert all(torch.equal(ck['model'][k], w0[k]) for k in params)
