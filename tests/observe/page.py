"""The status page in headless Chromium, driven over WebDriver (Selenium with Debian's
chromium-driver): a bucket created a moment before appears, and a bucket's crash and restart
show in the supervision tree. Run by tests/observe/page.sh:

    python3 tests/observe/page.py KV_BINARY CLIENT_PORT PAGE_URL SCREENSHOT
"""

import subprocess
import sys

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

kv, port, url, screenshot = sys.argv[1:5]


def kv_cli(*words):
    subprocess.run([kv, "cli", "-p", port, *words], check=True, capture_output=True)


options = Options()
for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1150"):
    options.add_argument(argument)
options.binary_location = "/usr/bin/chromium"
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.get(url)
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: "KV.Registry" in d.find_element(By.ID, "tree").text)
    for index in range(3):
        kv_cli("CREATE", f"orders-{index}")
        for key in range(index + 1):
            kv_cli("PUT", f"orders-{index}", f"k{key}", "v")
    kv_cli("CREATE", "fresh-bucket")
    kv_cli("PUT", "fresh-bucket", "k", "v")
    rows = 'tr[data-bucket="fresh-bucket"]'
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, rows))
    kv_cli("DEBUG", "CRASH", "fresh-bucket")
    wait.until(lambda d: "1 crashed, 1 restarted from disk" in d.find_element(By.ID, "tree").text)
    # Searching by name narrows the listing.
    driver.find_element(By.ID, "search").send_keys("fresh")
    wait.until(lambda d: d.find_element(By.ID, "pageInfo").text.endswith("(1 buckets)"))
    driver.find_element(By.ID, "search").clear()
    driver.find_element(By.ID, "search").send_keys("-")
    wait.until(lambda d: d.find_element(By.ID, "pageInfo").text.endswith("(4 buckets)"))
    driver.save_screenshot(screenshot)
    print("page: the new bucket, its crash and restart, and the search all showed;", screenshot)
finally:
    driver.quit()
