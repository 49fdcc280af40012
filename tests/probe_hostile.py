"""Issue 13's probe, as an attacker would run it, against a real `xportrait serve --engine warp`
subprocess on loopback (bounded: a few requests per part, seconds to a minute each). Not a test:
it prints what each attack got (status, message, the server's threads/fds/RSS from /proc), and
the server log's tracebacks at the end. tests/test_hostile.py and tests/test_leaks.py keep the
bounded checks.

usage: python tests/probe_hostile.py PART...
parts: hijack bomb stall cross auth leak resize json sdp retarget
"""
import asyncio
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]
import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from live_helpers import FPS, Peer, Webcam, encoded, raw_request  # noqa: E402
from PIL import Image  # noqa: E402

from streamer import samples  # noqa: E402

PY = sys.executable
LOG = os.path.join(tempfile.gettempdir(), "probe_hostile_serve.log")
TOKEN = "t0ken"


def start(*extra):
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([PY, "-m", "streamer", "serve", "--engine", "warp", "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=open(LOG, "w"), text=True, env=env)
    deadline = time.time() + 120
    for line in proc.stdout:
        m = re.search(r"(https?://[^ ]+/) ", line)
        if m:
            return proc, m.group(1).rstrip("/")
        if time.time() > deadline:
            break
    proc.kill()
    raise SystemExit("serve did not start: " + open(LOG).read()[-2000:])


def counts(pid):
    rss = hwm = 0
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            rss = int(line.split()[1]) // 1024
        if line.startswith("VmHWM"):
            hwm = int(line.split()[1]) // 1024
    return {"threads": len(os.listdir(f"/proc/{pid}/task")), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "rss_mb": rss, "hwm_mb": hwm}


def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def clip():
    return [f for f, _ in samples.driving_clip("astronaut", frames=2 * FPS, fps=FPS)]


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def until(cond, timeout):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.05)
    return True


async def stats(http):
    return await (await http.get("/stats", headers=AUTH)).json()


def show(label, value):
    print(f"[{label}] {value}", flush=True)


async def hijack(http, proc, frames):
    a, m = Peer(Webcam(lambda i: frames[i % len(frames)], 10**6)), Peer(Webcam(lambda i: frames[i % len(frames)], 10**6))
    assert (await a.offer(http, headers=AUTH)).status == 200
    assert (await m.offer(http, headers=AUTH)).status == 200
    await until(lambda: len(a.received) > 3 and len(m.received) > 3, 30)
    text = json.dumps(await stats(http))
    show("hijack /stats has secrets", a.secret in text or m.secret in text or "secret" in text)
    url = f"/avatar?session={a.session}&portrait=grace_hopper"
    for name, h in (("none", {}), ("mallory's", m.control), ("the id", {"X-Session-Secret": a.session}),
                    ("query", None)):
        u = url + (f"&secret={a.secret}" if h is None else "")
        r = await http.post(u, headers={**AUTH, **(h or {})})
        show(f"hijack with {name} secret", (r.status, (await r.text())[:120]))
    r = await http.post(url, headers={**AUTH, **a.control})
    show("owner's change", r.status)
    # retarget from mallory's data channel: only mallory's session may change
    m.channel.send(json.dumps({"type": "retarget", "head_pose": 0, "session": a.session}))
    await asyncio.sleep(1.0)
    s = {x["id"]: x for x in (await stats(http))["sessions"]}
    show("retarget with a foreign 'session' field", (s[a.session]["retargeting"], s[m.session]["retargeting"],
                                                     [x for x in m.stats if x.get("type") != "stats"][-1:]))
    await a.close(), await m.close()


async def bomb(http, proc, frames):
    big = io.BytesIO()
    Image.new("RGB", (10_000, 6_000), (90, 90, 90)).save(big, "PNG")
    bomb60 = big.getvalue()
    under = io.BytesIO()
    Image.new("RGB", (7_000, 5_600), (90, 90, 90)).save(under, "PNG")  # 39.2 MP: under the budget
    under39 = under.getvalue()
    show("bomb sizes KB", (len(bomb60) // 1024, len(under39) // 1024))
    show("bomb before", counts(proc.pid))
    silent = []
    for _ in range(4):
        p = Peer(Webcam(lambda i: frames[0], 10**6))
        r = await p.offer(http, answer=False, headers=AUTH)
        silent.append(p)
        if r.status == 200:
            u = await http.post(f"/avatar?session={p.session}", data=bomb60, headers={**AUTH, **p.control})
            show("upload on a silent session", (u.status, (await u.text())[:100]))
    for p in silent:
        await p.close()
    await until(lambda: False, 7)  # the connect timeout frees them
    peers = [Peer(Webcam(lambda i: frames[i % len(frames)], 10**6)) for _ in range(4)]
    for p in peers:
        r = await p.offer(http, headers=AUTH)
        show("offer", r.status)
    await until(lambda: all(len(p.received) > 3 for p in peers), 40)
    t = time.perf_counter()
    rs = await asyncio.gather(*(http.post(f"/avatar?session={p.session}", data=bomb60, headers={**AUTH, **p.control})
                                for p in peers for _ in range(2)))
    show("8 x 60 MP", ([r.status for r in rs], round(time.perf_counter() - t, 2), (await rs[0].text())[:160]))
    show("after 60 MP", counts(proc.pid))
    t = time.perf_counter()
    rs = await asyncio.gather(*(http.post(f"/avatar?session={p.session}", data=under39, headers={**AUTH, **p.control})
                                for p in peers for _ in range(2)))
    show("8 x 39 MP", ([r.status for r in rs], round(time.perf_counter() - t, 2), (await rs[0].text())[:160]))
    show("after 39 MP", counts(proc.pid))
    for p in peers:
        await p.close()


async def stall(http, proc, frames):
    p = Peer(Webcam(lambda i: frames[i % len(frames)], 10**6))
    assert (await p.offer(http, headers=AUTH)).status == 200
    await until(lambda: len(p.received) > 10, 30)
    photo = np.asarray(Image.fromarray(samples.portrait("grace_hopper")).resize((4000, 5000)))
    jpeg = encoded(photo, quality=95)
    n0, t0 = len(p.received), time.perf_counter()
    await asyncio.sleep(3)
    before = (len(p.received) - n0) / (time.perf_counter() - t0)
    n0, t0 = len(p.received), time.perf_counter()
    gaps = []
    last = [time.perf_counter()]

    async def watch():
        seen = len(p.received)
        while True:
            await asyncio.sleep(0.01)
            if len(p.received) != seen:
                now = time.perf_counter()
                gaps.append(now - last[0])
                last[0], seen = now, len(p.received)

    w = asyncio.ensure_future(watch())
    rs = await asyncio.gather(*(http.post(f"/avatar?session={p.session}", data=jpeg, headers={**AUTH, **p.control})
                                for _ in range(10)))
    took = time.perf_counter() - t0
    during = (len(p.received) - n0) / took
    w.cancel()
    show("stall: 10 concurrent uploads", (sorted(r.status for r in rs), f"{took:.2f} s",
                                         f"fps before {before:.1f} during {during:.1f}", f"max gap {max(gaps):.2f} s"))
    await p.close()


async def cross(http, proc, frames, url):
    port = int(url.rsplit(":", 1)[1])
    p = Peer(Webcam(lambda i: frames[0], 10))
    await p.pc.setLocalDescription(await p.pc.createOffer())
    body = json.dumps({"sdp": p.pc.localDescription.sdp, "type": "offer"})
    r = await http.post("/offer", data=body, headers={**AUTH, "Content-Type": "text/plain"})
    show("text/plain offer", (r.status, (await r.text())[:100]))
    r = await http.post("/offer", data=body, headers={**AUTH, "Content-Type": "application/json",
                                                      "Origin": "http://evil.example"})
    show("foreign Origin", (r.status, (await r.text())[:100]))
    r = await http.get("/stats", headers={**AUTH, "Host": f"evil.example:{port}"})
    show("foreign Host", (r.status, (await r.text())[:100]))
    for host in ("[::1", "[zz]", "a" * 5000, "h\u00e9", "[::1]:x", ":80", "127.0.0.1:99999"):
        status, text = await raw_request(port, f"GET /stats HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                                       f"Connection: close\r\n\r\n".encode("latin-1", "replace"))
        show(f"Host {host[:20]!r}", (status, text[:100]))
    for origin in (b"http://[::1", b"http://\xff\xfe", b"http://127.0.0.1:%d" % port):
        status, text = await raw_request(port, b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nOrigin: %s\r\n"
                                       b"Authorization: Bearer %s\r\nConnection: close\r\n\r\n" % (port, origin, TOKEN.encode()))
        show(f"Origin {origin[:20]!r}", (status, text[:100]))
    await p.close()


async def auth(http, proc, frames, url):
    port = int(url.rsplit(":", 1)[1])
    for header in (b"Bearer t0\xff\xfeken", b"\xff", b"Bearer " + b"\xc3" * 5000):
        status, text = await raw_request(port, b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + header +
                                 b"\r\nConnection: close\r\n\r\n")
        show(f"Authorization {header[:16]!r}", (status, text[:90]))
    for q in ("token=%ff%fe", "token=t0ken%00", "token=%C3%28"):
        r = await http.get(f"/stats?{q}")
        show(f"query {q}", (r.status, (await r.text())[:80]))
    status, text = await raw_request(port, b"POST /avatar?session=%ff HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer t0ken\r\n"
                                   b"X-Session-Secret: \xff\xfe\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    show("avatar bad bytes", (status, text[:120]))
    p = Peer(Webcam(lambda i: frames[i % len(frames)], 10**6))
    assert (await p.offer(http, headers=AUTH)).status == 200
    await until(lambda: len(p.received) > 3, 30)
    u = f"/avatar?session={p.session}"
    h = {**AUTH, **p.control}
    for label, data, ctype in (("not an image", b"hello there" * 100, "application/octet-stream"),
                               ("truncated png", encoded(frames[0], "PNG")[:2000], "image/png"),
                               ("multipart no boundary", b"--x\r\n", "multipart/form-data"),
                               ("multipart truncated", b"--xx\r\nContent-Disposition: form-data; name=\"f\"; "
                                b"filename=\"a.png\"\r\n\r\n" + encoded(frames[0], "PNG")[:5000], "multipart/form-data; boundary=xx"),
                               ("multipart bad header", b"--xx\r\n\xff\xfe: y\r\n\r\nabc\r\n--xx--\r\n",
                                "multipart/form-data; boundary=xx"),
                               ("gif bomb-ish", encoded(np.zeros((2, 2, 3), np.uint8), "GIF"), "image/gif")):
        r = await http.post(u, data=data, headers={**h, "Content-Type": ctype})
        show(f"upload {label}", (r.status, (await r.text())[:140]))
        await asyncio.sleep(0.3)
    await p.close()


async def leak(http, proc, frames, n=20):
    warm = 3
    portrait = encoded(samples.portrait("grace_hopper"))

    async def one(i):
        p = Peer(Webcam(lambda k: frames[k % len(frames)], 10**6))
        r = await p.offer(http, headers=AUTH, mode="echo" if i % 3 == 2 else "animate")
        assert r.status == 200, await r.text()
        await until(lambda: len(p.received) >= 5, 30)
        if i % 3 != 2:
            p.channel.send('{"type": "recalibrate"}')
            p.channel.send('{"type": "retarget", "head_pose": 0.5}')
            await http.post(f"/avatar?session={p.session}", data=portrait, headers={**AUTH, **p.control})
        await p.close()
        await until(lambda: False, 0.2)

    for i in range(warm):
        await one(i)
    for _ in range(50):
        if (await stats(http))["sessions_active"] == 0:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)
    before = counts(proc.pid)
    t = time.perf_counter()
    for i in range(n):
        await one(i)
    for _ in range(100):
        if (await stats(http))["sessions_active"] == 0:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.5)
    show(f"leak: {n} sessions in {time.perf_counter() - t:.0f} s", (before, counts(proc.pid),
                                                                    (await stats(http))["worker_threads"]))


async def resize(http, proc, frames):
    import cv2
    seg = FPS + FPS // 2
    sizes = [(640, 480), (1280, 720), (320, 240), (1920, 1080)]
    pics = {}

    def pic(i):
        size = sizes[min(i // seg, 3)]
        k = (i % len(frames), size)
        if k not in pics:
            pics[k] = cv2.resize(frames[k[0]], size)
        return pics[k]

    for i in range(4 * seg):
        pic(i)
    p = Peer(Webcam(pic, 4 * seg))
    assert (await p.offer(http, headers=AUTH)).status == 200
    await until(lambda: p.stats and p.stats[-1].get("frames_in", 0) >= 4 * seg - 2, 60)
    await asyncio.sleep(0.6)
    s = [x for x in p.stats if x.get("type") == "stats"][-1]
    show("resize", {k: s[k] for k in ("frames_in", "frames_out", "resolution_changes", "errors")})
    await p.close()


async def jsonbad(http, proc, frames):
    p = Peer(Webcam(lambda i: frames[0], 10))
    await p.pc.setLocalDescription(await p.pc.createOffer())
    sdp = p.pc.localDescription.sdp
    j = {"Content-Type": "application/json", **AUTH}
    for label, body in (("portrait list", {"sdp": sdp, "type": "offer", "portrait": ["a"]}),
                        ("portrait dict", {"sdp": sdp, "type": "offer", "portrait": {"a": 1}}),
                        ("mode list", {"sdp": sdp, "type": "offer", "mode": ["echo"]}),
                        ("sdp list", {"sdp": [sdp], "type": "offer"}),
                        ("type dict", {"sdp": sdp, "type": {"a": 1}}),
                        ("top list", [1, 2])):
        r = await http.post("/offer", data=json.dumps(body), headers=j)
        show(f"json {label}", (r.status, (await r.text())[:100]))
    for label, data in (("nested", "[" * 100000), ("nested obj", '{"a":' * 50000), ("NaN", '{"sdp": NaN}'),
                        ("bad utf8", b'{"sdp": "\xff"}'), ("huge int", '{"sdp": ' + "9" * 5000 + "}"),
                        ("over limit", json.dumps({"sdp": "x" * 400_000, "type": "offer"})), ("empty", "")):
        r = await http.post("/offer", data=data, headers=j)
        show(f"json {label}", (r.status, r.content_type, (await r.text())[:100]))
    show("sessions after", (await stats(http))["sessions_active"])
    await p.close()


async def sdp(http, proc, frames):
    p = Peer(Webcam(lambda i: frames[0], 10))
    await p.pc.setLocalDescription(await p.pc.createOffer())
    good = p.pc.localDescription.sdp
    j = {**AUTH}
    cases = {
        "no fingerprint": "\r\n".join(x for x in good.split("\r\n") if not x.startswith("a=fingerprint")),
        "m=video NaN": re.sub(r"m=video \d+", "m=video NaN", good),
        "junk line": good.replace("a=mid:0", "junk", 1),
        "bad fingerprint": re.sub(r"a=fingerprint:sha-256 \S+", "a=fingerprint:sha-256 zz", good),
        "bad candidate": good.replace("a=mid:0", "a=mid:0\r\na=candidate:x y z", 1),
        "rtpmap junk": good.replace("a=rtpmap:", "a=rtpmap:x", 1),
        "setup junk": good.replace("a=setup:actpass", "a=setup:zzz"),
        "ssrc junk": good.replace("a=mid:0", "a=mid:0\r\na=ssrc:abc cname:x", 1),
        "fmtp junk": good.replace("a=mid:0", "a=mid:0\r\na=fmtp:97 apt=", 1),
        "extmap junk": good.replace("a=mid:0", "a=mid:0\r\na=extmap:z urn:x", 1),
        "two video": good + good[good.index("m=video"):],
        "sctp port junk": good.replace("a=sctp-port:5000", "a=sctp-port:xyz"),
        "max-message-size junk": good.replace("a=max-message-size:65536", "a=max-message-size:abc"),
        "c= junk": good.replace("c=IN IP4", "c=IN IP9", 1),
        "group junk": good.replace("a=group:BUNDLE", "a=group:BUNDLE 7 8 9 #", 1),
    }
    for label, text in cases.items():
        t = time.perf_counter()
        r = await http.post("/offer", json={"sdp": text, "type": "offer"}, headers=j)
        show(f"sdp {label}", (r.status, round(time.perf_counter() - t, 2), (await r.text())[:150]))
        if r.status == 200:
            show("  sessions", (await stats(http))["sessions_active"])
    await asyncio.sleep(0.5)
    show("sessions after sdp", (await stats(http))["sessions_active"])
    await p.close()


async def retarget(http, proc, frames):
    p = Peer(Webcam(lambda i: frames[i % len(frames)], 10**6))
    assert (await p.offer(http, headers=AUTH)).status == 200
    await until(lambda: len(p.received) > 3 and p.channel.readyState == "open", 30)
    msgs = ['{"type": "retarget", "head_pose": NaN}', '{"type": "retarget", "head_pose": Infinity}',
            '{"type": "retarget", "head_pose": -Infinity}', '{"type": "retarget", "head_pose": 1e400}',
            '{"type": "retarget", "mouth_open": ' + "9" * 400 + "}", '{"type": "retarget", "eyes": ["open"]}',
            '{"type": "retarget", "eyes": {"a": 1}}', '{"type": "retarget", "expression": true}',
            '{"type": "retarget", "expression": "1"}', '{"type": "retarget", "zzz": 1}',
            '{"type": "retarget", "expression": [1]}', '{"type": ["retarget"]}', '{"type": {"x": 1}}',
            '[' * 100000, '"retarget"', '{"type": "retarget", "head_pose": 0.25}', b'\xff\xfe'.decode("latin-1"),
            '{"type": "retarget", "' + "k" * 100000 + '": 1}']
    for m in msgs:
        p.channel.send(m)
    await asyncio.sleep(1.5)
    replies = [x for x in p.stats if x.get("type") in ("error", "retargeting")]
    for x in replies:
        show("retarget reply", json.dumps(x)[:140])
    s = (await stats(http))["sessions"][0]
    show("retarget in force, errors, still streaming", (s["retargeting"], s["errors"], len(p.received)))
    n0 = len(p.received)
    # a flood of recalibrates and retargets
    out0 = (await stats(http))["sessions"][0]["frames_out"]
    cpu0, mine0, wall0 = cpu(proc.pid), time.process_time(), time.perf_counter()
    made0, in0 = p.webcam.index, (await stats(http))["sessions"][0]["frames_in"]
    for i in range(3000):  # in bursts, so that this client's own loop keeps sending its video
        p.channel.send('{"type": "recalibrate"}')
        p.channel.send('{"type": "retarget", "head_pose": %f}' % ((i % 20) / 10))
        if i % 100 == 99:
            await asyncio.sleep(0.03)
    await asyncio.sleep(3)
    show("flood: server / this client CPU s over wall s", (round(cpu(proc.pid) - cpu0, 2),
                                                          round(time.process_time() - mine0, 2),
                                                          round(time.perf_counter() - wall0, 2)))
    listed = (await stats(http))["sessions"]
    show("flood: webcam frames made by this client / arrived at the server", (p.webcam.index - made0,
                                                                            listed[0]["frames_in"] - in0 if listed else None))
    out1 = (await stats(http))["sessions"][0]["frames_out"]
    show("flood: frames received / sent by the server in 3 s, counts", (len(p.received) - n0, out1 - out0,
                                                                        counts(proc.pid)))
    n0 = len(p.received)
    await asyncio.sleep(5)
    out2 = (await stats(http))["sessions"][0]["frames_out"]
    show("after the flood: frames received / sent in 5 s, counts", (len(p.received) - n0, out2 - out1,
                                                                    counts(proc.pid)))
    await p.close()


async def flood(http, proc, frames):
    """One peer floods its data channel: does another session's stream go on?"""
    a, b = (Peer(Webcam(lambda i: frames[i % len(frames)], 10**6)) for _ in range(2))
    for p in (a, b):
        assert (await p.offer(http, headers=AUTH)).status == 200
    await until(lambda: len(a.received) > 3 and len(b.received) > 3 and a.channel.readyState == "open", 30)
    n0, t0 = len(b.received), time.perf_counter()
    await asyncio.sleep(3)
    before = (len(b.received) - n0) / (time.perf_counter() - t0)
    n0, t0 = len(b.received), time.perf_counter()
    for i in range(3000):
        a.channel.send('{"type": "recalibrate"}')
        a.channel.send('{"type": "retarget", "head_pose": %f}' % ((i % 20) / 10))
        if i % 100 == 99:
            await asyncio.sleep(0.03)
    await asyncio.sleep(3)
    during = (len(b.received) - n0) / (time.perf_counter() - t0)
    n0, t0 = len(b.received), time.perf_counter()
    await asyncio.sleep(3)
    after = (len(b.received) - n0) / (time.perf_counter() - t0)
    show("flood on A: B's fps before / during / after", (round(before, 1), round(during, 1), round(after, 1)))
    await a.close(), await b.close()


PARTS = {"flood": flood, "hijack": hijack, "bomb": bomb, "stall": stall, "cross": cross, "auth": auth, "leak": leak,
         "resize": resize, "json": jsonbad, "sdp": sdp, "retarget": retarget}


async def main(parts):
    proc, url = start("--token", TOKEN, "--max-sessions", "4", "--idle-timeout", os.environ.get("IDLE", "3"), "--connect-timeout", "5")
    show("server", (url, counts(proc.pid)))
    frames = clip()
    try:
        async with aiohttp.ClientSession(url) as http:
            for part in parts:
                fn = PARTS[part]
                t = time.perf_counter()
                if part in ("cross", "auth"):
                    await fn(http, proc, frames, url)
                else:
                    await fn(http, proc, frames)
                show(f"{part} took", f"{time.perf_counter() - t:.1f} s; server alive: {proc.poll() is None}")
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        show("server exit", proc.returncode)
        log = open(LOG).read()
        tracebacks = log.count("Traceback")
        show("server log tracebacks", tracebacks)
        if tracebacks:
            print(log[-4000:])


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
