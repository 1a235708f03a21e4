"""The den web console in a real browser: headless Chromium from Debian,
driven by Selenium through the system chromedriver (never downloaded).

Run by the `console_browser_flow` test of the api test binary, which starts
the server and sets DEN_TEST_URL, DEN_TEST_TOKEN (the server administrator)
DEN_OTHER_TOKEN (an admin of another organisation, which owns sprite
`theirs`) and DEN_VIEWER_TOKEN (a viewer of the first organisation). With DEN_CONSOLE_SCREENSHOTS=<dir> it also writes screenshots.

Every step waits for a condition with a deadline; nothing sleeps.
"""

import json
import os
import re
import time
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

URL = os.environ["DEN_TEST_URL"]
TOKEN = os.environ["DEN_TEST_TOKEN"]
OTHER = os.environ["DEN_OTHER_TOKEN"]
VIEWER = os.environ["DEN_VIEWER_TOKEN"]
SHOTS = os.environ.get("DEN_CONSOLE_SCREENSHOTS")
WAIT = 30
SPRITE = "console-demo"
row = f"tr[data-sprite='{SPRITE}']"
item = "#checkpoints li[data-checkpoint]"


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = os.environ.get("DEN_CHROMIUM", "/usr/bin/chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,800", "--force-device-scale-factor=1", "--hide-scrollbars"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=os.environ.get("DEN_CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(service=service, options=opts)


d = browser()


def until(what, cond, timeout=WAIT):
    """Poll `cond` (a function of nothing) until it answers truthy."""

    def probe(_):
        try:
            return cond()
        except StaleElementReferenceException:
            return False

    try:
        return WebDriverWait(d, timeout, poll_frequency=0.1).until(probe)
    except TimeoutException:
        toasts = [t.text for t in d.find_elements(By.CSS_SELECTOR, ".toast")]
        shot(f"failed-{re.sub('[^a-z0-9]+', '-', what.lower())}")
        raise AssertionError(f"timed out waiting for: {what} (toasts: {toasts})") from None


def css(sel):
    return d.find_element(By.CSS_SELECTOR, sel)


def visible(sel):
    def f():
        els = d.find_elements(By.CSS_SELECTOR, sel)
        return els[0] if els and els[0].is_displayed() else None
    return until(f"{sel} visible", f)


def shot(name):
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        # Passing messages are not what the picture is about.
        d.execute_script("document.querySelectorAll('.toast').forEach(t => t.remove())")
        d.save_screenshot(os.path.join(SHOTS, f"{name}.png"))


def toast_with(text):
    return until(f"a message with {text!r}", lambda: any(text in t.text for t in d.find_elements(By.CSS_SELECTOR, ".toast")))


def terminal_lines():
    return d.execute_script(
        "return [...document.querySelectorAll('#terminal .xterm-rows > div')].map(r => r.textContent.replace(/\\u00a0/g, ' ').trimEnd())")


def type_in_terminal(text):
    css("#terminal .xterm-helper-textarea").send_keys(text)


def run_in_terminal(command, marker_re):
    """Type `command`, wait for an output line matching `marker_re`."""
    type_in_terminal(command + "\n")
    rx = re.compile(marker_re)

    def f():
        for line in terminal_lines():
            m = rx.fullmatch(line.strip())
            if m:
                return m
        return None
    return until(f"terminal output {marker_re!r}", f)


def api(method, path, body=None):
    """The API with the administrator's token, for what the console test
    needs done behind the page's back."""
    req = urllib.request.Request(URL + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        text = r.read()
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text.decode()


def login(token):
    d.get(URL + "/#/login")
    login_here(token)


def login_here(token):
    box = visible("#login-token")
    box.clear()
    box.send_keys(token)
    css("#login-submit").click()


def logout():
    css("#logout").click()
    visible("#login-token")


def step(name):
    print(f"console: {name}", flush=True)


def tab(name):
    d.execute_script("window.scrollTo(0, 0)")
    css(f"#tab-{name}").click()
    return visible(f"#panel-{name}")



def check_browser_log():
    # Nothing the CSP refused and no script error: either means the console
    # is broken in a real browser. (Refused API calls log as failed loads,
    # the viewer's refused terminal as a failed handshake.)
    logs = d.get_log("browser")
    csp = [l["message"] for l in logs if "Content Security Policy" in l["message"]]
    assert not csp, f"CSP violations: {csp}"
    refused = ("Failed to load resource", "Unexpected response code: 403")
    errors = [l["message"] for l in logs if l["level"] == "SEVERE" and not any(r in l["message"] for r in refused)]
    assert not errors, f"script errors: {errors}"


def part_flow():
    """The issue's flow: log in, create, terminal, resize, checkpoint, break,
    restore, the file back, a service's logs."""
    # -- the page and its headers come up without a token; data does not.
    step("a wrong token shows the API's error")
    login("den_0000000000000000000000000000000000000000")
    err = visible("#login-error")
    until("the refusal message", lambda: "invalid bearer token" in css("#login-error").text)
    assert css("#nav").get_attribute("hidden") is not None, "navigation shown without a login"

    step("log in")
    login(TOKEN)
    visible("#new-sprite-name")
    assert d.execute_script("return sessionStorage.getItem('den.token')") == TOKEN
    assert d.execute_script("return localStorage.getItem('den.token')") is None

    step("create a sprite")
    css("#new-sprite-name").send_keys(SPRITE)
    css("#create-sprite").click()
    until("the new sprite's row with a status", lambda: css(f"{row} .badge").text in ("running", "warm", "cold"))
    toast_with(f"Created {SPRITE}")
    until("the toast to go", lambda: not d.find_elements(By.CSS_SELECTOR, ".toast"), timeout=15)
    shot("sprites-light")

    step("the list follows changes made elsewhere, live")
    # The fallback poll is every 10 s: three sprites made behind the page's
    # back all showing within 2.5 s takes the live stream (without it, the
    # odds are about 1 in 60).
    for i in range(3):
        other = f"{SPRITE}-live{i}"
        api("POST", "/v1/sprites", {"name": other})
        t0 = time.monotonic()
        until(f"{other} in the list", lambda: d.find_elements(By.CSS_SELECTOR, f"tr[data-sprite='{other}']"))
        took = time.monotonic() - t0
        assert took < 2.5, f"{other} showed after {took:.1f} s: the list is not live"
        api("DELETE", f"/v1/sprites/{other}")

    step("terminal: echo hi")
    css(f"{row} a.sprite-link").click()
    visible("#panel-terminal")
    until("a shell session", lambda: css("#terminal").get_attribute("data-session"))
    run_in_terminal("echo hi", r"hi")

    step("terminal follows the window size")
    cols0 = int(css("#terminal").get_attribute("data-cols"))
    m = run_in_terminal("echo size=$(stty size)", r"size=(\d+) (\d+)")
    assert int(m.group(2)) == cols0, f"stty cols {m.group(2)} != terminal cols {cols0}"
    d.set_window_size(960, 720)
    until("fewer columns after the resize", lambda: int(css("#terminal").get_attribute("data-cols")) < cols0)
    cols1 = int(css("#terminal").get_attribute("data-cols"))
    rows1 = int(css("#terminal").get_attribute("data-rows"))
    run_in_terminal("clear; echo size=$(stty size)", rf"size={rows1} {cols1}")
    d.set_window_size(1280, 800)
    until("the width back", lambda: int(css("#terminal").get_attribute("data-cols")) == cols0)
    run_in_terminal("printf 'precious\\n' > keep.txt && echo wr''itten; ls -l keep.txt", r"written")
    shot("terminal")

    step("reattach to the shell with its scrollback")
    session = css("#terminal").get_attribute("data-session")
    d.refresh()
    until("the same session again", lambda: css("#terminal").get_attribute("data-session") == session)
    until("its scrollback", lambda: any(l.strip() == "written" for l in terminal_lines()))

    step("paste into and copy from the terminal")
    d.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": URL, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    clip_set = "navigator.clipboard.writeText(arguments[0]).then(() => arguments[1](''), e => arguments[1](String(e)))"
    clip_get = "navigator.clipboard.readText().then(t => arguments[0](t), e => arguments[0]('error: ' + e))"
    assert d.execute_async_script(clip_set, "echo pas''ted") == ""
    css("#term-paste").click()
    type_in_terminal("\n")
    until("the pasted command's output", lambda: "pasted" in [l.strip() for l in terminal_lines()])
    assert d.execute_async_script(clip_set, "") == ""
    line = d.execute_script(
        "return [...document.querySelectorAll('#terminal .xterm-rows > div')].find(r => r.textContent.trim() === 'pasted')")
    ActionChains(d).move_to_element_with_offset(line, -line.size["width"] // 2 + 8, 0).double_click().perform()
    css("#term-copy").click()
    until("the selection on the clipboard", lambda: d.execute_async_script(clip_get) == "pasted")

    step("create a checkpoint")
    tab("checkpoints")
    css("#checkpoint-comment").send_keys("before the break")
    css("#create-checkpoint").click()
    until("the checkpoint in the timeline", lambda: any("before the break" in li.text for li in d.find_elements(By.CSS_SELECTOR, item)))
    shot("checkpoints")

    step("break a file on the files page")
    tab("files")
    visible("tr[data-file='keep.txt'] a").click()
    area = visible("#file-content")
    until("the file's content", lambda: css("#file-content").get_attribute("value") == "precious\n")
    area.clear()
    area.send_keys("broken")
    css("#file-save").click()
    toast_with("Saved")

    step("restore the checkpoint")
    tab("checkpoints")
    restore = until("the checkpoint's restore button", lambda: next(
        (li.find_element(By.CSS_SELECTOR, "[data-action='restore']") for li in d.find_elements(By.CSS_SELECTOR, item)
         if "before the break" in li.text), None))
    restore.click()
    until("the confirm state", lambda: "Confirm" in restore.text)
    restore.click()
    until("the restore to finish", lambda: css("#checkpoint-progress").text.startswith("Restored"), timeout=60)

    step("the file is back")
    tab("files")
    visible("tr[data-file='keep.txt'] a").click()
    until("the file's old content", lambda: css("#file-content").get_attribute("value") == "precious\n")

    step("a service's logs")
    tab("services")
    css("#service-name").send_keys("ticker")
    css("#service-cmd").send_keys("sh")
    css("#service-args").send_keys('["-c", "i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done"]')
    css("#create-service").click()
    svc = "tr[data-service='ticker']"
    until("the service running", lambda: css(f"{svc} .badge").text == "running")
    css(f"{svc} [data-action='logs']").click()
    until("its log lines", lambda: re.search(r"tick \d+", css("#service-logs").text))
    first = css("#service-logs").text
    until("the logs to move on (live)", lambda: css("#service-logs").text != first)


def part_more():
    """Files, settings, fork and delete, themes and widths, and who sees
    what, on a sprite with a checkpoint made through the API."""
    api("POST", "/v1/sprites", {"name": SPRITE})
    api("POST", f"/v1/sprites/{SPRITE}/checkpoint", {"comment": "before the break"})
    login(TOKEN)
    visible(row)
    d.get(URL + f"/#/sprites/{SPRITE}/files")
    visible("#panel-files")
    step("upload a file")
    up = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"den-console-upload-{os.getpid()}.txt")
    with open(up, "w") as f:
        f.write("uploaded through the console\n")
    css("#files-upload").send_keys(up)
    name = os.path.basename(up)
    visible(f"tr[data-file='{name}'] a").click()
    until("the uploaded content", lambda: css("#file-content").get_attribute("value") == "uploaded through the console\n")
    os.unlink(up)

    step("network policy editor")
    tab("network")
    css("#panel-network button:not(.primary)").click()
    visible("#policy-rows .policy-domain").send_keys("example.com")
    css("#policy-save").click()
    toast_with("Network policy saved")
    tab("files")
    tab("network")
    until("the saved rule", lambda: [e.get_attribute("value") for e in d.find_elements(By.CSS_SELECTOR, "#policy-rows .policy-domain")] == ["example.com"])

    step("URL setting")
    tab("settings")
    until("the URL", lambda: SPRITE in css("#settings-url").text)
    d.execute_script("document.querySelector('#url-auth').value = 'public'")
    css("#url-save").click()
    toast_with("URL is now public")
    tab("network")
    tab("settings")
    until("the saved setting", lambda: css("#url-auth").get_attribute("value") == "public")

    step("fork a checkpoint, then delete the fork")
    tab("checkpoints")
    li = until("the checkpoint", lambda: next((li for li in d.find_elements(By.CSS_SELECTOR, item) if "before the break" in li.text), None))
    li.find_element(By.CSS_SELECTOR, ".fork-name").send_keys("console-fork")
    li.find_element(By.CSS_SELECTOR, "[data-action='fork']").click()
    until("the fork's page", lambda: css("#sprite-name").text == "console-fork")
    # Its terminal wakes it; let that finish before the delete.
    until("a shell in the fork", lambda: css("#terminal").get_attribute("data-session"), timeout=60)
    tab("settings")
    delete = visible("#delete-sprite")
    delete.click()
    until("the confirm state", lambda: "Really" in delete.text)
    delete.click()
    until("back on the list without the fork", lambda: d.find_elements(By.CSS_SELECTOR, row)
          and not d.find_elements(By.CSS_SELECTOR, "tr[data-sprite='console-fork']"))
    assert not css("#nav-nodes").is_displayed(), "Nodes shown on a single node"

    step("dark theme, phone width (the list in one column, a terminal that fits)")
    d.get(URL + "/#/")
    visible(row)
    css("#theme-toggle").click()
    until("the dark theme", lambda: d.execute_script("return document.documentElement.dataset.theme") == "dark")
    shot("sprites-dark")
    d.set_window_size(390, 844)
    visible(row)
    until("one column: the URL column hidden", lambda: not css(f"{row} .url-cell").is_displayed())
    css(f"{row} a.sprite-link").click()
    until("a shell session", lambda: css("#terminal").get_attribute("data-session"))
    until("a phone-sized terminal", lambda: int(css("#terminal").get_attribute("data-cols")) < 50)
    run_in_terminal("echo phone''ok", r"phoneok")
    shot("phone")
    d.set_window_size(1280, 800)

    step("a new tab reattaches to the detached shell instead of starting another")
    shell = css("#terminal").get_attribute("data-session")
    d.get(URL + "/#/")
    visible(row)
    until("the shell detached", lambda: [s["is_active"] for s in api("GET", f"/v1/sprites/{SPRITE}/exec")["sessions"]
                                         if str(s["id"]) == shell] == [False])
    d.execute_script(f"sessionStorage.removeItem('den.session.{SPRITE}')")
    d.get(URL + f"/#/sprites/{SPRITE}/terminal")
    until("the same shell", lambda: css("#terminal").get_attribute("data-session") == shell)
    until("its scrollback", lambda: "phoneok" in [l.strip() for l in terminal_lines()])

    step("another organisation's token sees only its own sprites")
    logout()
    login(OTHER)
    until("its own sprite", lambda: d.find_elements(By.CSS_SELECTOR, "tr[data-sprite='theirs']"))
    assert not d.find_elements(By.CSS_SELECTOR, row), "another organisation's sprite is listed"
    d.get(URL + f"/#/sprites/{SPRITE}/checkpoints")
    toast_with("not found")
    assert not d.find_elements(By.CSS_SELECTOR, f"{item}"), "another organisation's checkpoints shown"

    step("a token revoked mid-session sends the user back to the login, with the reason")
    logout()
    minted = api("POST", "/v1/tokens", {"name": "console-revoked", "role": "member"})
    d.get(URL + f"/#/sprites/{SPRITE}/checkpoints")
    login_here(minted["token"])
    until("the deep link opened after the login", lambda: d.find_elements(By.CSS_SELECTOR, f"{item}"))
    api("DELETE", f"/v1/tokens/{minted['id']}")
    d.get(URL + "/#/")
    until("the refusal on the login", lambda: "token was refused" in visible("#login-error").text)

    step("a viewer's terminal says why it can't open")
    login(VIEWER)
    visible(row)
    d.get(URL + f"/#/sprites/{SPRITE}/terminal")
    toast_with("a viewer token can't run commands")


PARTS = {"flow": part_flow, "more": part_more}

try:
    PARTS[os.environ.get("DEN_CONSOLE_PART", "flow")]()
    check_browser_log()
    step("all steps passed")
finally:
    d.quit()
