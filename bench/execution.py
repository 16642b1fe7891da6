"""Server-side execution benchmark: the proxy against jupyter-server-nbmodel.

    python -m bench.execution [--lines 20000] [--rounds 3]

A cell printing N flushed lines, executed server-side (a frontend has the notebook open, as a
Y client), until the saved .ipynb on disk holds every line and the execution count: through
the proxy (`POST /api/kernels/{id}/execute` with JupyterLab's `{cell_id, document_id}`) in
front of a stock jupyter-server, and by jupyter-server-nbmodel inside its own jupyter-server
(installed in a virtual environment of the benchmark's own), alternating, one run. Also the
bytes of Y updates the frontend receives per printed line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import nbformat
from pycrdt import YMessageType, YSyncMessageType

from proxy.upstream import Upstream
from proxy.yroom import NotebookRoom
from tests.conftest import JupyterServer, start_jupyter_server, stop_jupyter_server

from .relay import ProxyProcess


class CountingViewer(NotebookRoom):
    """A frontend with the notebook open, counting the bytes of Y updates it receives."""

    update_bytes = 0

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse, data: bytes) -> None:
        if data[0] == YMessageType.SYNC and data[1] == YSyncMessageType.SYNC_UPDATE:
            self.update_bytes += len(data)
        await super()._receive(ws, data)


NBMODEL = "jupyter_server_nbmodel==0.2.9"  # the release measured in the README


def nbmodel_python(tmp: Path) -> str:
    """A virtual environment with jupyter-server-nbmodel on top of this one's packages (a .pth
    file puts them on its path, whether this environment is a venv or the system's)."""
    venv = tmp / "nbmodel-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "bench-parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", NBMODEL], check=True)
    return python


def start_nbmodel_server(tmp: Path, python: str) -> JupyterServer:
    """start_jupyter_server, run by the nbmodel environment's interpreter, with the extensions
    of this environment (collaboration) enabled beside the venv's own (nbmodel)."""
    config = tmp / "config"
    config.mkdir(parents=True, exist_ok=True)
    (tmp / "data").mkdir(exist_ok=True)  # where jupyter_server_fileid keeps its database
    extensions = {"jupyter_server_ydoc": True, "jupyter_server_fileid": True,
                  "jupyter_server_nbmodel": True}  # fmt: skip
    (config / "jupyter_server_config.json").write_text(
        json.dumps({"ServerApp": {"jpserver_extensions": extensions}})
    )
    real = sys.executable
    sys.executable = python
    try:
        return start_jupyter_server(tmp)
    finally:
        sys.executable = real


def write_notebook(root: Path, name: str, lines: int) -> str:
    code = f"for i in range({lines}):\n    print(i, flush=True)"
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}  # fmt: skip
    cell = nbformat.v4.new_code_cell(code)
    cell["id"] = "printing"
    notebook.cells.append(cell)
    nbformat.write(notebook, root / name)
    return code


async def one_run(
    server: JupyterServer, base: str, name: str, lines: int, via_proxy: bool, limit: float
) -> tuple[float, float, int]:
    """Seconds until the saved notebook has every line and the count (or `limit`); Y bytes
    per line; lines saved by then."""
    code = write_notebook(server.root_dir, name, lines)
    async with aiohttp.ClientSession(headers=server.headers()) as http:
        async with http.post(base + "api/sessions", json={
            "path": name, "type": "notebook", "name": name, "kernel": {"name": "python3"},
        }) as resp:  # fmt: skip
            kernel_id = (await resp.json())["kernel"]["id"]
        async with http.put(
            base + f"api/collaboration/session/{name}", json={"format": "json", "type": "notebook"}
        ) as resp:
            document_id = f"json:notebook:{(await resp.json())['fileId']}"
        upstream = Upstream(server.url, server.token)
        await upstream.start()
        viewer = CountingViewer(upstream, name)
        viewer.start()
        await viewer.ready()
        await asyncio.sleep(1.0)  # the kernel is up, the room loaded
        body = (
            {"cell_id": "printing", "document_id": document_id}
            if via_proxy
            else {"code": code, "metadata": {"cell_id": "printing", "document_id": document_id}}
        )
        started = time.perf_counter()
        async with http.post(base + f"api/kernels/{kernel_id}/execute", json=body) as resp:
            assert resp.status == 202, await resp.text()
        path = server.root_dir / name
        while True:
            await asyncio.sleep(0.05)
            try:  # on a thread: the viewer keeps reading its websocket meanwhile
                cell = (await asyncio.to_thread(nbformat.read, path, as_version=4)).cells[0]
            except (ValueError, OSError):
                continue
            saved = "".join(o.get("text", "") for o in cell.outputs).count("\n")
            if cell.execution_count is not None and saved >= lines:
                break
            if time.perf_counter() - started > limit:
                break
        elapsed = time.perf_counter() - started
        per_line = viewer.update_bytes / lines
        await viewer.close()
        await upstream.close()
        async with http.delete(base + f"api/kernels/{kernel_id}"):
            pass
    return elapsed, per_line, saved


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=float, default=300, help="seconds a run may take")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-execution-") as name:
        tmp = Path(name)
        python = nbmodel_python(tmp)
        stock = start_jupyter_server(tmp / "stock")
        nbmodel = start_nbmodel_server(tmp / "nbmodel", python)
        proxy = ProxyProcess(stock, tmp)
        try:
            await proxy.ready(stock.token)
            times: dict[str, list[float]] = {"proxy": [], "nbmodel": []}
            sizes: dict[str, list[float]] = {"proxy": [], "nbmodel": []}
            for round_ in range(args.rounds):
                for who in ("proxy", "nbmodel"):
                    server = stock if who == "proxy" else nbmodel
                    base = proxy.url if who == "proxy" else nbmodel.url
                    seconds, per_line, saved = await one_run(
                        server, base, f"bench-{who}-{round_}.ipynb", args.lines, who == "proxy",
                        args.limit,
                    )  # fmt: skip
                    times[who].append(seconds)
                    sizes[who].append(per_line)
                    print(
                        f"round {round_ + 1} {who}: {seconds:.2f} s, {saved:,} lines saved, "
                        f"{per_line:.1f} B/line",
                        flush=True,
                    )
            ratio = statistics.median(times["proxy"]) / statistics.median(times["nbmodel"])
            print(
                f"{args.lines:,} lines to the saved notebook: proxy median "
                f"{statistics.median(times['proxy']):.2f} s, nbmodel "
                f"{statistics.median(times['nbmodel']):.2f} s, ratio {ratio:.2f}; Y update bytes "
                f"per line: proxy {statistics.median(sizes['proxy']):.1f}, nbmodel "
                f"{statistics.median(sizes['nbmodel']):.1f}"
            )
        finally:
            proxy.stop()
            stop_jupyter_server(stock)
            stop_jupyter_server(nbmodel)


if __name__ == "__main__":
    asyncio.run(main())
