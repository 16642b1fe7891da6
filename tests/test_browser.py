"""JupyterLab in a real browser (Debian's chromium, driven by playwright) through the proxy:
a cell that keeps printing after its tab closed shows every line, its count and no [*] when
the notebook is opened again; two tabs open at once both show every line exactly once; input()
of a server-side execution is answered in the cell."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import uuid
from pathlib import Path

import nbformat
import pytest
from playwright.async_api import Browser, Page, async_playwright

from .conftest import JupyterServer, finished_in_log, make_proxy

CHROMIUM = "/usr/bin/chromium"
LINES = 12
CODE = (
    f"import time\nfor i in range({LINES}):\n    print(f'line {{i}}', flush=True)\n"
    "    time.sleep(0.4)"
)
EXPECTED = "".join(f"line {i}\n" for i in range(LINES))


@pytest.fixture
async def browser() -> Browser:
    if shutil.which(CHROMIUM) is None:  # CI installs it (.ci/run): never skipped
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        yield launched
        await launched.close()


def _notebook(root: Path, name: str, code: str = CODE) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python",
    }  # fmt: skip
    cell = nbformat.v4.new_code_cell(code)
    cell["id"] = "printing"
    notebook.cells.append(cell)
    nbformat.write(notebook, root / name)


def _lab_url(proxy_url: str, name: str, token: str) -> str:
    """The notebook in a workspace of its own: JupyterLab restores a workspace's open documents,
    and the default one is shared by every browser."""
    return proxy_url + f"lab/workspaces/{uuid.uuid4().hex}/tree/{name}?reset&token={token}"


async def _open(browser: Browser, url: str) -> Page:
    page = await (await browser.new_context()).new_page()
    page.set_default_timeout(60_000)
    await page.goto(url)
    return await notebook_ready(page)


async def notebook_ready(page: Page) -> Page:
    """Once the page shows the notebook, its kernel is ready (the toolbar's kernel status shows
    it idle) and JupyterLab has restored its layout (its splash screen is gone: until then a
    key pressed in a cell may go nowhere)."""
    await page.locator(".jp-Notebook .jp-Cell").first.wait_for()
    await page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for()
    await page.locator("#jupyterlab-splash").wait_for(state="detached")
    return page


def _requests_logged(log: Path) -> int:
    with contextlib.closing(sqlite3.connect(log)) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM messages"
            " WHERE direction = 'to_kernel' AND msg_type = 'execute_request'"
        ).fetchone()
    return count


async def run_first_cell(page: Page, log: Path) -> None:
    """Shift+Enter in the first cell, until its execute_request reaches the proxy (its log at
    `log` has one more). Just after a page looks ready (cells shown, kernel idle, splash gone)
    the key press now and then goes nowhere: no request leaves the page (seen about once in 20
    page loads; JupyterLab's cause not found). Pressed again only then: had the first press
    sent a request after all, the cell would run twice and the test fail."""
    before = _requests_logged(log)
    for _ in range(3):
        await page.locator(".jp-Cell").first.click()
        await page.keyboard.press("Shift+Enter")
        for _ in range(100):
            if _requests_logged(log) > before:
                return
            await asyncio.sleep(0.1)
    raise AssertionError("Shift+Enter sent no execute_request, three times")


async def shows_every_line_and_the_count(page: Page) -> None:
    """The reopened notebook: every line of the cell, and [1], not [*]."""
    await _wait_for(page, f"line {LINES - 1}")
    for _ in range(50):  # the count and the idle prompt follow the last line
        if await _prompt(page) == "[1]:":
            break
        await asyncio.sleep(0.2)
    assert _lines(await _output(page)) == EXPECTED
    assert await _prompt(page) == "[1]:"  # not [*]


async def saved_with_every_line(path: Path) -> None:
    """The notebook on disk: the cell's count and every line, once the server saved them."""

    def saved() -> dict:
        return nbformat.read(path, as_version=4).cells[0]

    for _ in range(100):
        if saved().get("execution_count") == 1:
            break
        await asyncio.sleep(0.2)
    cell = saved()
    assert cell["execution_count"] == 1
    assert "".join(o.get("text", "") for o in cell["outputs"]) == EXPECTED


async def _output(page: Page) -> str:
    return await page.locator(".jp-Cell").first.locator(".jp-OutputArea").inner_text()


async def _prompt(page: Page) -> str:
    return await page.locator(".jp-Cell").first.locator(".jp-InputPrompt").inner_text()


async def _wait_for(page: Page, text: str, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while text not in await _output(page):
        assert asyncio.get_running_loop().time() < deadline, f"no {text!r} in the output"
        await asyncio.sleep(0.2)


def _lines(shown: str) -> str:
    return "".join(line + "\n" for line in shown.splitlines() if line.startswith("line "))


@pytest.mark.parametrize("server_side", [True, False], ids=["server-side", "client-side"])
async def test_jupyterlab_tab_closed_mid_run_then_reopened(
    aiohttp_server, jupyter_server: JupyterServer, tmp_path: Path, browser: Browser,
    server_side: bool,
) -> None:  # fmt: skip
    name = f"browser-{'server' if server_side else 'client'}.ipynb"
    _notebook(jupyter_server.root_dir, name)
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link="zmq", handoff_grace=1.0,
        server_side_execution=server_side,
    )  # fmt: skip
    first = await _open(browser, _lab_url(running.url, name, jupyter_server.token))
    await run_first_cell(first, tmp_path / "log.sqlite")
    await _wait_for(first, "line 2")
    await first.context.close()  # the tab goes away while the cell prints on

    await finished_in_log(tmp_path / "log.sqlite")  # the cell ends with nobody watching
    second = await _open(browser, _lab_url(running.url, name, jupyter_server.token))
    try:
        await shows_every_line_and_the_count(second)
    finally:
        await second.context.close()
    await saved_with_every_line(jupyter_server.root_dir / name)


async def test_two_tabs_show_every_line_once(
    aiohttp_server, jupyter_server: JupyterServer, tmp_path: Path, browser: Browser
) -> None:
    name = "browser-two-tabs.ipynb"
    _notebook(jupyter_server.root_dir, name)
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link="zmq",
    )  # fmt: skip
    one = await _open(browser, _lab_url(running.url, name, jupyter_server.token))
    two = await _open(browser, _lab_url(running.url, name, jupyter_server.token))
    try:
        await run_first_cell(one, tmp_path / "log.sqlite")
        for page in (one, two):  # (the count follows every output the tab is sent)
            await shows_every_line_and_the_count(page)
    finally:
        await one.context.close()
        await two.context.close()


async def test_input_of_a_server_side_execution_is_answered_in_the_cell(
    aiohttp_server, jupyter_server: JupyterServer, tmp_path: Path, browser: Browser
) -> None:
    name = "browser-input.ipynb"
    _notebook(jupyter_server.root_dir, name, "name = input('Name?')\nprint('hello', name)")
    running = await make_proxy(
        aiohttp_server, jupyter_server.url, jupyter_server.token, jupyter_server.runtime_dir,
        tmp_path / "log.sqlite", link="zmq", server_side_execution=True,
    )  # fmt: skip
    page = await _open(browser, _lab_url(running.url, name, jupyter_server.token))
    try:
        await run_first_cell(page, tmp_path / "log.sqlite")
        answer = page.locator(".jp-Cell").first.locator(".jp-Stdin-input")
        await answer.fill("ada")
        await answer.press("Enter")
        await _wait_for(page, "hello ada")
        assert await page.locator(".jp-Stdin-input").count() == 0
        shown = [line for line in (await _output(page)).splitlines() if line]
        assert shown == ["Name? ada", "hello ada"]
    finally:
        await page.context.close()
