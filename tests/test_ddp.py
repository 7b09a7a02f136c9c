"DDP on CPU (gloo): torchrun with two processes, two 'nodes' as two torchrun invocations on loopback, SLURM-launched tasks; replicas end identical."
import os, subprocess, sys, textwrap
import pytest
import torch

from tps.config import save_config

pytestmark = pytest.mark.slow   # DDP subprocesses (torchrun, two nodes, SLURM)

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


@pytest.mark.parametrize('method', ['tps', 'davsn'])
def test_ddp_replicas_identical(smoke_config, tmp_path, method):
    "Two ranks end with the same network (DA-VSN: and the same discriminators, saved once with the run)."
    from tps.train import list_checkpoints, load_training_checkpoint
    cfg = smoke_config(method, iters=3, save_every=3)
    if method == 'davsn': cfg.model.fusion = 'splat'
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


# ---------------------------------------------------------------- two "nodes": two torchrun invocations on loopback
_NODE_SCRIPT = textwrap.dedent('''
    import os, sys, torch
    import tps.train as T
    from tps.config import load_config
    cfg, out = load_config(sys.argv[1]), sys.argv[2]
    nets = []
    build = T.build_model
    def capture(mc):
        net = build(mc); nets.append(net); return net
    T.build_model = capture
    run = T.train(cfg)                                   # no run_dir: rank 0 makes one under train.out_root
    torch.save({k: v.clone() for k, v in nets[0].state_dict().items()}, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
    print('RUN', run, 'RANK', os.environ['RANK'], 'WORLD', os.environ['WORLD_SIZE'], 'LOCAL', os.environ['LOCAL_RANK'])
''')


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_two_nodes_on_loopback(smoke_config, tmp_path):
    "`torchrun --nnodes 2 --node-rank i` twice, as on two machines: identical weights on both ranks, one run folder."
    from tps.train import list_checkpoints, load_training_checkpoint
    cfg = smoke_config('tps', iters=2, save_every=2)
    cpath = tmp_path/'cfg.yaml'; save_config(cfg, cpath)
    script = tmp_path/'node_train.py'; script.write_text(_NODE_SCRIPT)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc-per-node', '1',
                               '--node-rank', str(i), '--master-addr', '127.0.0.1', '--master-port', str(port),
                               str(script), str(cpath), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = []
    try:
        for p in procs: outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
    for p, (o, e) in zip(procs, outs): assert p.returncode == 0, (o + e)[-3000:]
    assert 'RANK 0 WORLD 2 LOCAL 0' in outs[0][0] and 'RANK 1 WORLD 2 LOCAL 0' in outs[1][0]
    runs = [p for p in (tmp_path/'runs'/cfg.name).iterdir()]
    assert len(runs) == 1, runs                                      # one run folder, written by the first node's rank 0
    run = runs[0]
    assert all(f'RUN {run}' in o for o, _ in outs)                   # both ranks trained into it
    w0, w1 = (torch.load(tmp_path/f'rank{i}.pt') for i in (0, 1))
    params = [k for k in w0 if 'running' not in k and 'num_batches' not in k]
    diff = [k for k in params if not torch.equal(w0[k], w1[k])]
    assert not diff, f"the nodes' replicas differ: {diff[:5]}"
    ck = load_training_checkpoint(run)
    assert [p.name for p in list_checkpoints(run)] == ['iter_0000002.pth'] and ck['world_size'] == 2 and len(ck['rng']) == 2
    assert all(torch.equal(ck['model'][k], w0[k]) for k in params)


# ---------------------------------------------------------------- SLURM: ranks from srun's variables
def test_slurm_variable_mapping():
    from tps.distributed import distributed_env, _first_slurm_host
    slurm = {'SLURM_PROCID': '5', 'SLURM_NTASKS': '8', 'SLURM_LOCALID': '1', 'SLURM_JOB_NODELIST': 'gpu[03-04]',
             'SLURM_JOB_ID': '4242'}
    assert distributed_env(slurm) == {'rank': 5, 'world_size': 8, 'local_rank': 1, 'source': 'slurm',
                                      'master_addr': 'gpu03', 'master_port': '19242'}
    # given MASTER_ADDR / MASTER_PORT win over the derived ones
    e = distributed_env({**slurm, 'MASTER_ADDR': 'head', 'MASTER_PORT': '29511'})
    assert (e['master_addr'], e['master_port']) == ('head', '29511')
    # torchrun's variables win over SLURM's (torchrun launched inside an allocation)
    assert distributed_env({**slurm, 'RANK': '1', 'WORLD_SIZE': '2', 'LOCAL_RANK': '1'}) == \
        {'rank': 1, 'world_size': 2, 'local_rank': 1, 'source': 'torchrun'}
    # one task, or no launcher at all: a single process, no rendezvous needed
    assert distributed_env({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}) == {'rank': 0, 'world_size': 1, 'local_rank': 0, 'source': 'slurm'}
    assert distributed_env({}) == {'rank': 0, 'world_size': 1, 'local_rank': 0, 'source': 'single'}
    assert distributed_env({'SLURM_PROCID': '0', 'SLURM_NTASKS': '2', 'SLURM_NODELIST': 'n1,n2', 'SLURM_JOB_ID': '7'})['master_addr'] == 'n1'
    for nodes, first in (('node17', 'node17'), ('a[1-3],b2', 'a1'), ('gpu[07,09-10]', 'gpu07'), ('r[1-2]-n[01-04]', 'r1-n01')):
        assert _first_slurm_host(nodes) == first, nodes
    with pytest.raises(RuntimeError, match='MASTER_ADDR'):
        distributed_env({'SLURM_PROCID': '1', 'SLURM_NTASKS': '2'})


_SLURM_SCRIPT = textwrap.dedent('''
    import torch, torch.distributed as dist
    from tps.train import setup_distributed
    info = setup_distributed('cpu')
    x = torch.tensor([float(info['rank'] + 1)]); dist.all_reduce(x)
    print('RANK', info['rank'], 'WORLD', info['world_size'], 'SUM', int(x.item()), 'OWNER', info['owner'])
    dist.destroy_process_group()
''')


def test_slurm_tasks_join_one_process_group(tmp_path):
    "Two processes with only srun's variables (no torchrun) join one gloo group through setup_distributed."
    script = tmp_path/'slurm_task.py'; script.write_text(_SLURM_SCRIPT)
    base = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    base.update(OMP_NUM_THREADS='1', SLURM_NTASKS='2', SLURM_JOB_NODELIST='127.0.0.1', MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, str(script)], env={**base, 'SLURM_PROCID': str(i), 'SLURM_LOCALID': str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = []
    try:
        for p in procs: outs.append(p.communicate(timeout=120))
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
    for p, (o, e) in zip(procs, outs): assert p.returncode == 0, (o + e)[-3000:]
    assert [o.split()[:6] for o, _ in outs] == [['RANK', '0', 'WORLD', '2', 'SUM', '3'], ['RANK', '1', 'WORLD', '2', 'SUM', '3']]
