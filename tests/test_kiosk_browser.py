"""The kiosk page in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by selenium through ``/usr/bin/chromedriver``: nothing downloads a browser or a driver),
against the simulated card field through the real serial driver and a real clearing host on
127.0.0.1 (:class:`clearinghost.demo_kiosk.KioskSite`).

A customer tops up with cash, with a voucher and with a pending load and pays a utility bill,
and takes the card away at each step of a load and of a bill debit: the page says "put the card
back", and the card and the host show exactly one load or debit. Waits are WebDriverWait with
generous bounds (hangs only); nothing asserts how fast anything is.

``CARDAGENT_KIOSK_SCREENSHOTS=docs/kiosk`` writes the main screens there (as committed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from clearinghost.demo_kiosk import KioskSite
from tests.fake_reader.scenario import REPO
from tests.test_kiosk import CREDIT, DEBIT, INIT, TearOnce

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BOUND_S = 120.0


def _require_browser() -> None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            pytest.fail(
                f"{path} not found: apt-get install -y chromium chromium-driver "
                f"(Debian package {package}; scripts/bootstrap installs both)"
            )


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    _require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=900,1100",
        "--lang=zh-CN",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        options.add_argument(flag)
    # the driver's path is given: Selenium Manager never runs, nothing is downloaded
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(BOUND_S)
    yield driver
    driver.quit()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[KioskSite]:
    site = KioskSite(tmp_path / "site", note_timeout_s=2.0)
    yield site
    site.close()


class Page:
    def __init__(self, driver: WebDriver, site: KioskSite, shots: Path) -> None:
        self.driver, self.site, self.shots = driver, site, shots
        driver.get(site.url)
        self.until(lambda d: d.find_element(By.ID, "message").text != "")

    def until(self, condition: Any, what: str = "") -> Any:
        return WebDriverWait(
            self.driver,
            BOUND_S,
            poll_frequency=0.1,
            ignored_exceptions=[StaleElementReferenceException],
        ).until(condition, what)

    def body(self, name: str) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "body").get_attribute(f"data-{name}"))

    def wait_phase(self, *phases: str) -> str:
        self.until(lambda _d: self.body("phase") in phases, f"phase in {phases}")
        return self.body("phase")

    def wait_message(self, message: str) -> None:
        self.until(lambda _d: self.body("message") == message, f"message {message}")

    def click(self, selector: str) -> None:
        """Click the visible element; found again if the page redrew it meanwhile."""

        def clicked(driver: WebDriver) -> bool:
            for element in driver.find_elements(By.CSS_SELECTOR, selector):
                if element.is_displayed():
                    element.click()
                    return True
            return False

        self.until(clicked, f"click {selector}")

    def text(self, element_id: str) -> str:
        return str(self.driver.find_element(By.ID, element_id).text)

    def english(self) -> None:
        if self.driver.find_element(By.ID, "lang").text == "English":
            self.click("#lang")
        self.until(lambda d: d.find_element(By.ID, "lang").text == "中文")

    def shot(self, name: str) -> None:
        self.shots.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(self.shots / f"{name}.png"))


@pytest.fixture
def page(browser: WebDriver, site: KioskSite, tmp_path: Path) -> Iterator[Page]:
    target = os.environ.get("CARDAGENT_KIOSK_SCREENSHOTS")
    yield Page(browser, site, REPO / target if target else tmp_path / "shots")
    browser.get("about:blank")  # the page stops polling before its kiosk goes away


def _read_card(page: Page) -> None:
    page.click("#btn-read")
    assert page.wait_phase("ready", "failed") == "ready"


def test_cash_top_up(page: Page, site: KioskSite) -> None:
    assert page.text("message") == "欢迎使用，请选择业务"
    page.shot("welcome-zh")
    page.english()
    assert page.text("message") == "Welcome: choose a service"
    card = site.card(11, balance=500)
    site.field.insert(card)
    _read_card(page)
    assert page.text("balance") == "5.00"
    page.click('.tab[data-source="cash"]')
    page.click("#btn-cash")
    page.wait_phase("cash")
    site.notes.insert(2000)
    site.notes.insert(1000)
    page.until(lambda d: d.find_element(By.ID, "cash-accepted").text == "30.00")
    site.notes.garbage()
    page.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".alert-garbage"))
    page.shot("cash")
    page.click("#btn-topup-cash")
    assert page.wait_phase("success", "failed") == "success"
    assert page.text("message") == "Top-up done"
    assert "30.00 yuan" in page.text("receipt") and "35.00 yuan" in page.text("receipt")
    page.shot("receipt-top-up")
    assert card.balance == 3500 and len(card.loads) == 1
    page.click("#btn-done")
    page.wait_phase("idle")
    _read_card(page)  # the card's own log (EF18) now shows the load
    assert page.text("balance") == "35.00"
    page.until(
        lambda d: (
            [
                r.find_elements(By.TAG_NAME, "td")[2].text
                for r in d.find_elements(By.CSS_SELECTOR, "#transactions tbody tr")
            ]
            == ["30.00"]
        ),
        "the load in the card's transaction log",
    )
    page.click('.tab[data-source="voucher"]')
    page.shot("card")


def test_voucher_used_twice_says_so(page: Page, site: KioskSite) -> None:
    card = site.card(12, balance=500)
    site.field.insert(card)
    site.authority.add_voucher("GIFT-0012", 2000)
    for attempt, expected in enumerate(("success", "failed")):
        _read_card(page)
        page.click('.tab[data-source="voucher"]')
        page.click('.amount[data-amount="2000"]')
        code = page.driver.find_element(By.ID, "voucher-code")
        code.clear()
        code.send_keys("GIFT-0012")
        page.click("#btn-topup-voucher")
        assert page.wait_phase("success", "failed") == expected, attempt
        if expected == "failed":
            page.wait_message("refused:voucher_used")
            assert page.text("message") == "充值券已被使用，未扣款"
            page.shot("voucher-used")
            page.click("#btn-back")
        else:
            page.click("#btn-done")
        page.wait_phase("idle")
    assert card.balance == 2500 and len(card.loads) == 1


def test_pending_load(page: Page, site: KioskSite) -> None:
    page.english()
    card = site.card(13, balance=1000)
    site.authority.credit(card.asn.hex().upper(), 3000, "employer", "test", pending_id="EMP-13")
    site.field.insert(card)
    _read_card(page)
    page.click('.tab[data-source="pending"]')
    page.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.pending-load[data-pending="EMP-13"]'))
    page.shot("pending-load")
    page.click('.pending-load[data-pending="EMP-13"] button')
    assert page.wait_phase("success", "failed") == "success"
    assert card.balance == 4000 and site.authority.pending_loads(card.asn.hex()) == []


@pytest.mark.parametrize(
    ("command", "when"),
    [(INIT, "before"), (INIT, "after"), (CREDIT, "before"), (CREDIT, "after")],
    ids=["init-before", "init-after", "credit-before", "credit-after"],
)
def test_card_removed_mid_load_put_it_back(
    page: Page, site: KioskSite, command: tuple[int, int], when: str
) -> None:
    card = site.card(14, balance=500)
    site.field.insert(card)
    site.authority.add_voucher("GIFT-0014", 5000)
    _read_card(page)
    site.field.remove()
    site.field.insert(TearOnce(card, command, when, p1=0x00 if command == INIT else None))
    page.click('.tab[data-source="voucher"]')
    page.click('.amount[data-amount="5000"]')
    page.driver.find_element(By.ID, "voucher-code").send_keys("GIFT-0014")
    page.click("#btn-topup-voucher")
    assert page.wait_phase("put_back", "success", "failed") == "put_back"
    assert page.text("message") == "请将卡片放回读卡区"
    if command == CREDIT and when == "after":
        page.shot("put-back")
    site.field.insert(card)
    assert page.wait_phase("success", "failed") == "success"
    assert card.balance == 5500 and len(card.loads) == 1  # never a second load
    states = [v.state for v in site.authority.loads()]
    assert states.count("completed") == 1 and set(states) <= {"completed", "not_credited"}


@pytest.mark.parametrize("when", ["before", "after"])
def test_bill_payment_card_removed_put_back(page: Page, site: KioskSite, when: str) -> None:
    page.english()
    site.load_bills()
    card = site.card(15, balance=20000)
    site.field.insert(TearOnce(card, DEBIT, when))
    page.click("#btn-bills")
    for key in "110105-0001":
        page.click(f'.key:not([data-key="back"]):nth-child({"123456789-0".index(key) + 1})')
    assert page.driver.find_element(By.ID, "account").get_attribute("value") == "110105-0001"
    page.click("#btn-lookup")
    page.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bill-list .bill")) == 4)
    if when == "before":
        page.shot("bills")
    page.click('.bill[data-bill="W-2026-11-0001"] button.pay')
    assert page.wait_phase("put_back", "success", "failed") == "put_back"
    assert page.text("message") == "Put the card back on the reader"
    site.field.insert(card)
    assert page.wait_phase("success", "failed") == "success"
    assert page.text("message") == "Bill paid"
    assert "42.50 yuan" in page.text("receipt") and "110105-0001" in page.text("receipt")
    if when == "before":
        page.shot("receipt-bill")
    assert card.balance == 20000 - 4250 and len(card.debits) == 1
    site.upload()
    page.click("#btn-done")
    page.wait_phase("idle")
    page.click("#btn-bills")
    page.click("#btn-lookup")
    page.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.bill.paid[data-bill="W-2026-11-0001"]'))
    assert site.storage.bill("W-2026-11-0001")["state"] == "paid"  # type: ignore[index]
