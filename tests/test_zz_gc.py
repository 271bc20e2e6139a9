import asyncio, os, signal, time, random
import asyncpg
import pytest
from pathlib import Path
from websockets.asyncio.client import connect
from .conftest import SECRET, TIMEOUT, insert
from .processes import free_port, mint, running_notifyd, serve_env, wait_until_healthy

@pytest.mark.parametrize("nofreeze", ["", "1"])
async def test_gc_probe(dsn, tmp_path, nofreeze):
    out = f"/tmp/gcprobe/out{nofreeze}.txt"
    Path(out).unlink(missing_ok=True)
    port = free_port()
    env = serve_env(dsn, port, NOTIFYD_JWT_SECRET=SECRET, PYTHONPATH="/tmp/gcprobe", GCPROBE_OUT=out, NOTIFYD_LOG_LEVEL="WARNING", GCPROBE_NOFREEZE=nofreeze)
    async with running_notifyd("serve", env=env) as server:
        await wait_until_healthy(port, server)
        stop = asyncio.Event()
        async def hold(i):
            while not stop.is_set():
                async with connect(f"ws://127.0.0.1:{port}/ws/message?token={mint(f'u{i}')}") as ws:
                    end = time.monotonic() + random.uniform(2, 60)
                    while time.monotonic() < end and not stop.is_set():
                        try:
                            await asyncio.wait_for(ws.recv(), 0.5)
                        except TimeoutError:
                            pass
        holders = [asyncio.create_task(hold(i)) for i in range(300)]
        conn = await asyncpg.connect(dsn)
        end = time.monotonic() + 25
        while time.monotonic() < end:
            await conn.execute("insert into t_message_real_time (title, send_user, to_user, type, content) values ('t','s',$1,'1','c')", f"u{random.randrange(300)}")
            await asyncio.sleep(0.005)
        server.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while not Path(out).exists() or "---" not in Path(out).read_text():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*holders, return_exceptions=True)
        await conn.close()
    print(nofreeze, Path(out).read_text()[:3000])
