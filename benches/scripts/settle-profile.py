#!/usr/bin/env python3
"""Where a settle line's time goes inside Redis (issue 19 item 2): runs the settle script of
metering/src/redis_scripts.rs and the script bodies in settle-profile/ directly in a private
redis-server (EVALSHA, INFO commandstats), 100 batches of 500 lines over 100,000 accounts.
Needs redis-server and the Python `redis` package (pip install redis).
Run: python3 benches/scripts/settle-profile.py"""
import json, os, re, socket, subprocess, tempfile, time

import redis

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = open(os.path.join(HERE, '..', '..', 'metering', 'src', 'redis_scripts.rs')).read()


def const(name):
    return re.search(r'pub\(crate\) const ' + name + r': &str = r#"(.*?)"#;', SRC, re.S).group(1)


def start():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
    p = subprocess.Popen(['redis-server', '--port', str(port), '--save', '', '--appendonly', 'no',
                          '--dir', tempfile.mkdtemp()], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            r = redis.Redis(port=port); r.ping(); return p, r
        except Exception:
            time.sleep(0.05)
    raise SystemExit('redis-server did not start')


def run(body, label, steady, n=100_000, batches=100, lines=500):
    proc, r = start()
    try:
        pipe = r.pipeline(transaction=False)
        for i in range(n):
            pipe.hset(f'tollgate:acct:acct-{i:07d}', mapping={
                'credited': 5000000000000, 'debited': 0, 'avail': 5000000000000, 'leased': 0,
                'status': 'active', 'ver': 1})
            if i % 10000 == 9999:
                pipe.execute()
        pipe.execute()
        sha = r.script_load('local SHARDED = false\n' + const('LUA_COMMON') + body)
        r.config_resetstat()
        for seq in range(1, batches + 1):
            seen, entries = set(), []
            for j in range(lines):
                a = f'acct-{(j if steady else ((seq * lines + j) * 7919) % n):07d}'
                if a in seen:
                    continue
                seen.add(a)
                entries.append({'account': a, 'cost': str(100 * 500000 + 2000 * 12500),
                                'give_back': '0', 'ask': '50000000', 'requests': '100',
                                'cpu_us': '2000', 'deploys': '0', 'rows_read': '0',
                                'rows_written': '0'})
            r.evalsha(sha, 1, 'tollgate:inc:bench:1', 'tollgate', 'bench', '1', str(seq),
                      'd%d' % seq, '10000', json.dumps(entries))
        st = r.info('commandstats')['cmdstat_evalsha']
        print(f"| {label} | {st['usec_per_call'] / lines:.1f} |")
    finally:
        proc.kill()


if __name__ == '__main__':
    print('| script body | µs per line |\n|---|---:|')
    for f in ['only_decode', 'only_hmget', 'hmget_hset', 'zadd_only']:
        run(open(os.path.join(HERE, 'settle-profile', f + '.lua')).read(), f, steady=False)
    for steady in (False, True):
        what = 'same 500 accounts each batch' if steady else 'every line a new lease'
        run(const('SETTLE'), f'settle script today, {what}', steady)
        run(open(os.path.join(HERE, 'settle-profile', 'rewrite.lua')).read(),
            f'rewrite (one HMGET, one HSET, lease in the account), {what}', steady)
