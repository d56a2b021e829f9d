// The kiosk page: polls /api/state and posts the customer's choices. No library, no CDN.
"use strict";

const TEXT = {
  zh: {
    title: "城市一卡通 自助服务", lang: "English", welcome: "欢迎使用，请选择业务",
    read_card: "查询 / 充值", pay_bills: "生活缴费（水·电·燃气·供暖）", balance: "卡内余额（元）",
    card_no: "卡号", transactions: "最近交易", trips: "乘车记录", when: "时间", type: "类型",
    amount: "金额", line: "线路", station: "站点", top_up: "充值", src_cash: "现金",
    src_voucher: "充值券（他充）", src_pending: "待圈存", cash_hint: "请按下按钮后投入纸币",
    insert_notes_btn: "投入纸币", voucher_hint: "请选择充值券面额并输入券号",
    top_up_now: "确认充值", pending_hint: "他人为您充值的款项，可在任意自助终端圈存",
    load_it: "圈存", accepted: "已收现金（元）", bills_title: "请输入缴费户号",
    look_up: "查询账单", finish: "完成", receipt_file: "下载凭条（文本）",
    footer: "自助服务终端 · 请勿在操作时移开卡片", present_card: "请将卡片放在读卡区",
    keep_still: "请勿移动卡片，正在处理…", card_read: "卡片已读取", no_card: "未检测到卡片",
    insert_notes: "请投入纸币", loaded: "充值成功", recovered: "充值成功（已确认上次充值）",
    put_back: "请将卡片放回读卡区", wrong_card: "这不是刚才那张卡，请放回原卡",
    card_not_back: "卡片未放回：本次充值已记录，请持卡到本终端确认或联系工作人员",
    bill_paid_ok: "缴费成功", bill_unresolved: "无法确认是否扣款：账单为“缴费处理中”，由清算中心核实",
    card_unreadable: "卡片无法读取", internal_error: "系统故障，请联系工作人员",
    acceptor_failed: "纸币识别器故障，已收金额已记录", topup_cash: "充值 ¥",
    state_open: "未缴", state_payment_pending: "缴费处理中", state_paid: "已缴", pay: "缴费",
    no_bills: "该户号没有账单", jam: "卡币：请联系工作人员，已收金额不受影响",
    note_timeout: "纸币未能确认收入，已记录待工作人员核对", garbage: "纸币识别器数据异常，已忽略",
    note_rejected: "纸币已退回，请换一张", not_loadable: "此卡不能在本地充值", bill_failed: "缴费失败",
    "refused:voucher_used": "充值券已被使用，未扣款", "refused:voucher_unknown": "充值券号无效",
    "refused:payment_mismatch": "金额与充值券或现金不符", "refused:balance_limit": "充值后余额将超过上限",
    "refused:bill_paid": "该账单已缴清", "refused:bill_payment_pending": "该账单正在其他终端缴费",
    "refused:insufficient_balance": "卡内余额不足，未扣款", "refused:bad_mac1": "卡片校验失败，未充值",
    "refused:load_unresolved": "上次充值结果待确认，请联系工作人员",
    "refused:load_pending": "此卡有未完成的充值，请先完成充值", "refused:payment_pending": "此卡有未完成的支付",
    "refused:pending_used": "该笔待圈存已圈存", "refused:unknown_card": "无法识别的卡片",
    refused: "业务被拒绝，未扣款", u_water: "水费", u_electricity: "电费", u_gas: "燃气费", u_heating: "供暖费", cash_kept: "已收现金已记录，请联系工作人员：",
    no_cash: "尚未收到纸币", busy: "正在处理，请稍候", bad_account: "户号格式不正确",
  },
  en: {
    title: "City Card Self-Service", lang: "中文", welcome: "Welcome: choose a service",
    read_card: "Balance / Top up", pay_bills: "Pay bills (water · power · gas · heating)",
    balance: "Balance (yuan)", card_no: "Card", transactions: "Recent transactions",
    trips: "Recent trips", when: "Time", type: "Type", amount: "Amount", line: "Line",
    station: "Stop", top_up: "Top up", src_cash: "Cash", src_voucher: "Voucher",
    src_pending: "Pending loads", cash_hint: "Press the button, then insert your notes",
    insert_notes_btn: "Insert notes", voucher_hint: "Choose the voucher's amount and type its code",
    top_up_now: "Top up now", pending_hint: "Money paid for your card by others, to load at any kiosk",
    load_it: "Load", accepted: "Cash accepted (yuan)", bills_title: "Enter the utility account number",
    look_up: "Look up bills", finish: "Finish", receipt_file: "Download the receipt (text)",
    footer: "Self-service kiosk · keep the card on the reader while it works",
    present_card: "Put your card on the reader", keep_still: "Keep the card still…",
    card_read: "Card read", no_card: "No card was presented", insert_notes: "Insert your notes",
    loaded: "Top-up done", recovered: "Top-up done (the interrupted top-up was confirmed)",
    put_back: "Put the card back on the reader", wrong_card: "That is another card: put the first card back",
    card_not_back: "The card did not come back: the top-up is recorded; show the card here again or ask staff",
    bill_paid_ok: "Bill paid", bill_unresolved: "Cannot tell whether the card was debited: the bill stays 'payment pending' for the clearing centre",
    card_unreadable: "The card cannot be read", internal_error: "Kiosk fault: please ask staff",
    acceptor_failed: "Note acceptor fault: the cash accepted is recorded", topup_cash: "Top up ¥",
    state_open: "Open", state_payment_pending: "Payment pending", state_paid: "Paid", pay: "Pay",
    no_bills: "No bills for this account", jam: "Note jam: please ask staff; the cash accepted is safe",
    note_timeout: "A note was not confirmed: it is recorded for staff to check",
    garbage: "The note acceptor sent garbage: ignored", note_rejected: "Note handed back: try another",
    not_loadable: "This card cannot be topped up here", bill_failed: "Bill payment failed",
    "refused:voucher_used": "The voucher was used already: nothing was loaded", "refused:voucher_unknown": "Unknown voucher code",
    "refused:payment_mismatch": "The amount does not match the voucher or the cash",
    "refused:balance_limit": "The balance would exceed the card's limit",
    "refused:bill_paid": "This bill is already paid", "refused:bill_payment_pending": "This bill is being paid at another kiosk",
    "refused:insufficient_balance": "Not enough money on the card: nothing was taken",
    "refused:bad_mac1": "The card failed its check: nothing was loaded",
    "refused:load_unresolved": "An earlier top-up is unresolved: please ask staff",
    "refused:load_pending": "This card has an unfinished top-up: finish it first",
    "refused:payment_pending": "This card has an unfinished payment", "refused:pending_used": "That pending load was loaded already",
    "refused:unknown_card": "Unknown card", cash_kept: "The cash accepted is recorded for you; ask staff: ",
    no_cash: "No note was accepted yet", busy: "Busy: please wait", bad_account: "That is not an account number",
    "refused:not_loadable": "This card cannot be topped up here (another city's, or disabled): nothing was taken",
    refused: "Refused: no money was taken",
    u_water: "Water", u_electricity: "Electricity", u_gas: "Gas", u_heating: "Heating",
  },
};

let lang = "zh";
let view = "home";
let source = null;
let voucherAmount = null;
let last = null;

const $ = (id) => document.getElementById(id);
const t = (key) => TEXT[lang][key] ?? (key.startsWith("refused:") ? TEXT[lang].refused : key);
const yuan = (fen) => (fen / 100).toFixed(2);

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const answer = await fetch(path, init);
  const data = await answer.json();
  if (!answer.ok) {
    showError(data);
    return null;
  }
  return data;
}

function showError(data) {
  const words = TEXT[lang];
  $("message").textContent = words["refused:" + data.error] ?? words[data.error] ?? words.refused;
  $("detail").textContent = data.detail ?? "";
  document.body.dataset.error = data.error;
}

function translate() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  $("lang").textContent = t("lang");
  $("voucher-code").placeholder = lang === "zh" ? "券号" : "Voucher code";
  $("account").placeholder = lang === "zh" ? "户号" : "Account number";
  if (last) render(last);
}

function rows(tbody, items, cells) {
  tbody.replaceChildren();
  for (const item of items) {
    const tr = document.createElement("tr");
    for (const value of cells(item)) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.append(td);
    }
    tbody.append(tr);
  }
}

function show(screen) {
  for (const id of ["home", "card", "cash", "bills", "waiting", "done"]) $(id).hidden = id !== screen;
}

function render(s) {
  last = s;
  document.body.dataset.phase = s.phase;
  document.body.dataset.message = s.message;
  document.body.dataset.view = view;
  if (!document.body.dataset.error || s.phase !== "idle" && s.phase !== "ready") {
    $("message").textContent = t(s.message);
    $("detail").textContent = s.detail ?? "";
  }
  $("busy").textContent = s.busy ? "…" : "";
  const card = s.card;
  if (card) {
    $("balance").textContent = yuan(card.balance);
    $("card-number").textContent = card.printed_number;
    $("not-loadable").hidden = card.loadable !== false;
    $("not-loadable").textContent = t("not_loadable");
    rows($("transactions").tBodies[0], card.transactions, (e) => [
      e.when ?? "", t(e.type === "load" ? "top_up" : "pay"), yuan(e.amount)]);
    rows($("trips").tBodies[0], card.trips, (e) => [e.when, e.line, e.station, yuan(e.amount)]);
  }
  const pending = $("pending-list");
  const pendingKey = lang + JSON.stringify(s.pending ?? []);
  if (pending.dataset.drawn !== pendingKey) pending.replaceChildren();
  for (const p of pending.dataset.drawn === pendingKey ? [] : s.pending ?? []) {
    const li = document.createElement("li");
    li.className = "pending-load";
    li.dataset.pending = p.pending_id;
    const label = document.createElement("span");
    label.textContent = `¥${yuan(p.amount)} · ${p.source}`;
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = t("load_it");
    button.addEventListener("click", () => start("/api/load", { source: "pending", pending_id: p.pending_id }));
    li.append(label, button);
    pending.append(li);
  }
  pending.dataset.drawn = pendingKey;
  if (s.cash) {
    $("cash-accepted").textContent = yuan(s.cash.accepted);
    $("cash-inserting").textContent = s.cash.inserting ? `… ¥${yuan(s.cash.inserting)}` : "";
    const alerts = $("cash-alerts");
    alerts.replaceChildren();
    for (const a of s.cash.alerts) {
      const li = document.createElement("li");
      li.className = "alert-" + a.code;
      li.textContent = t(a.code) + (a.amount ? ` (¥${yuan(a.amount)})` : "");
      alerts.append(li);
    }
    $("btn-topup-cash").textContent = t("topup_cash") + yuan(s.cash.accepted);
    $("btn-topup-cash").disabled = s.cash.accepted <= 0;
  }
  renderBills(s.bills);
  if (s.receipt) {
    $("receipt").textContent = s.receipt.text;
    $("receipt-file").href = "/receipts/" + s.receipt.file;
  }
  if (["waiting_card", "working", "put_back"].includes(s.phase)) show("waiting");
  else if (s.phase === "success") show("done");
  else if (s.phase === "cash") show("cash");
  else if (view === "bills") show("bills");
  else if (s.phase === "failed") show(card ? "card" : "home");
  else if (s.phase === "ready" && card) show("card");
  else show("home");
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("selected", tab.dataset.source === source);
  for (const id of ["cash", "voucher", "pending"]) $("pay-" + id).hidden = source !== id;
}

let drawnBills = "";

function renderBills(bills) {
  const list = $("bill-list");
  const key = lang + JSON.stringify(bills);
  if (key === drawnBills) return;  // unchanged: keep the buttons under the finger
  drawnBills = key;
  list.replaceChildren();
  if (!bills) return;
  if (bills.bills.length === 0) {
    const li = document.createElement("li");
    li.textContent = t("no_bills");
    list.append(li);
  }
  for (const b of bills.bills) {
    const li = document.createElement("li");
    li.className = "bill " + b.state;
    li.dataset.bill = b.bill_id;
    const label = document.createElement("span");
    label.textContent = `${t("u_" + b.utility)} · ${b.period} · ¥${yuan(b.amount)}`;
    const state = document.createElement("span");
    state.className = "state";
    state.textContent = t("state_" + b.state);
    li.append(label, state);
    if (b.state === "open") {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "pay";
      button.textContent = t("pay");
      button.addEventListener("click", () => start("/api/bills/pay", { bill_id: b.bill_id }));
      li.append(button);
    }
    list.append(li);
  }
}

async function start(path, body) {
  delete document.body.dataset.error;
  const state = await api(path, body);
  if (state) render(state);
}

async function poll() {
  try {
    const state = await api("/api/state");
    // redraw only what changed: a list redrawn under a finger loses the touch
    if (state && (!last || state.version !== last.version || state.busy !== last.busy)) render(state);
  } catch (err) {
    $("detail").textContent = String(err);
  }
  setTimeout(poll, 400);
}

function wire() {
  $("lang").addEventListener("click", () => { lang = lang === "zh" ? "en" : "zh"; translate(); });
  $("btn-read").addEventListener("click", () => { view = "home"; source = null; start("/api/card", {}); });
  $("btn-bills").addEventListener("click", () => { view = "bills"; if (last) render(last); });
  $("btn-bills-back").addEventListener("click", () => { view = "home"; start("/api/reset", {}); });
  $("btn-back").addEventListener("click", () => { source = null; start("/api/reset", {}); });
  $("btn-done").addEventListener("click", () => { view = "home"; source = null; start("/api/reset", {}); });
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => { source = tab.dataset.source; if (last) render(last); });
  }
  for (const button of document.querySelectorAll(".amount")) {
    button.addEventListener("click", () => {
      voucherAmount = Number(button.dataset.amount);
      for (const b of document.querySelectorAll(".amount")) b.classList.toggle("selected", b === button);
    });
  }
  $("btn-cash").addEventListener("click", () => start("/api/cash", {}));
  $("btn-topup-cash").addEventListener("click", () => start("/api/load", { source: "cash" }));
  $("btn-topup-voucher").addEventListener("click", () => start("/api/load", {
    source: "voucher", amount: voucherAmount, code: $("voucher-code").value.trim() }));
  for (const key of document.querySelectorAll(".key")) {
    key.addEventListener("click", () => {
      const field = $("account");
      field.value = key.dataset.key === "back" ? field.value.slice(0, -1) : field.value + key.textContent;
    });
  }
  $("btn-lookup").addEventListener("click", async () => {
    delete document.body.dataset.error;
    const answer = await api("/api/bills/lookup", { account: $("account").value.trim() });
    if (answer && last) { last.bills = answer; render(last); }
  });
  translate();
  poll();
}

document.addEventListener("DOMContentLoaded", wire);
