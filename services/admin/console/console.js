// The CrossLogic operator console: one page per tab, each drawn from the admin API
// (/admin/v1, opened by this browser's session cookie; writes carry the session's CSRF
// token). Everything shown is written as text, never as HTML.
"use strict";

const API = "/admin/v1";
let csrf = "";
let leave = () => {};  // what the page on screen must stop (its event streams, timers)

// ------------------------------------------------------------------ helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "onclick" || name === "onsubmit" || name === "onchange") {
      node.addEventListener(name.slice(2), value);
    } else if (value !== null && value !== undefined && value !== false) {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(method, path, body) {
  const headers = {"Accept": "application/json"};
  if (method !== "GET") headers["X-CSRF-Token"] = csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(API + path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body)});
  if (response.status === 401) { location.reload(); throw new Error("signed out"); }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    throw new Error((data && data.error && data.error.message) || response.statusText);
  }
  return data;
}

function toast(message, bad) {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.className = bad ? "show bad" : "show";
  setTimeout(() => { box.className = ""; }, 4000);
}

async function act(what, work) {
  try { await work(); toast(what); } catch (err) { toast(`${what}: ${err.message}`, true); }
}

function actions(...buttons) {
  return el("td", {}, el("div", {class: "actions"}, ...buttons));
}

function table(columns, rows, attrs) {
  return el("div", {class: "scroll"}, el("table", attrs || {},
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", {}, c)))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", {colspan: columns.length,
      class: "empty"}, "Nothing here yet.")))));
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${Math.round(seconds / 3600)} h`;
}

function figure(v) {
  // An axis label: a cost of a few millionths of a dollar must not read as 0.
  if (v !== 0 && Math.abs(v) < 0.01) return v.toExponential(1);
  return v.toLocaleString(undefined, {maximumSignificantDigits: 3});
}

function when(iso) { return iso ? new Date(iso).toLocaleString() : "—"; }
function pct(x) { return x === null || x === undefined ? "—" : `${Math.round(x * 100)} %`; }

function modal(title, ...body) {
  const box = el("dialog", {class: "modal"}, el("h2", {}, title), ...body,
    el("form", {method: "dialog"}, el("button", {}, "Close")));
  document.body.append(box);
  box.addEventListener("close", () => box.remove());
  box.showModal();
  return box;
}

// Server-sent events from the log, history first then live; `onEvent` gets each record.
function follow(query, onEvent) {
  const source = new EventSource(`${API}/events/stream?${query}`, {withCredentials: true});
  source.onmessage = (message) => onEvent(JSON.parse(message.data));
  return () => source.close();
}

// ------------------------------------------------------------------ fleet

async function fleetPage(main) {
  const body = el("div");
  main.append(el("h1", {}, "Fleet"), el("p", {class: "hint"},
    "Deployments and their nodes, live: node events redraw it as they happen."), body);
  let pending = null;
  const draw = async () => {
    pending = null;
    const [deployments, nodes] = await Promise.all([
      api("GET", "/deployments?limit=200"), api("GET", "/nodes?limit=200")]);
    const groups = new Map([[null, {name: "Not in a deployment", nodes: []}]]);
    for (const d of deployments.data) {
      groups.set(d.id, {name: `${d.model_name} (${d.regions.join(", ")}; ` +
        `${d.min_nodes}–${d.max_nodes} nodes${d.spot ? ", spot" : ""}) · ${d.status}`,
        nodes: []});
    }
    for (const n of nodes.data) {
      (groups.get(n.deployment_id) || groups.get(null)).nodes.push(n);
    }
    body.replaceChildren(...[...groups.values()].filter((g) => g.nodes.length || g.name !==
      "Not in a deployment").map((g) => el("section", {}, el("h2", {}, g.name),
      table(["Node", "Status", "Health", "Heartbeat", "Running", "Waiting", "KV cache",
             "Kind", "Region", ""], g.nodes.map(nodeRow), {"data-testid": "nodes"}))));
  };
  const nodeRow = (n) => {
    const hb = n.heartbeat || {};
    const live = !["terminated", "failed"].includes(n.status);
    return el("tr", {"data-node": n.id, "data-status": n.status},
      el("td", {title: n.id}, n.cluster_name || n.id.slice(0, 8)),
      el("td", {class: `status ${n.status}`}, n.status),
      el("td", {}, n.heartbeat ? String(hb.health_score) : "—"),
      el("td", {}, n.heartbeat ? age(hb.age_seconds) : "—"),
      el("td", {}, hb.num_requests_running ?? "—"),
      el("td", {}, hb.num_requests_waiting ?? "—"),
      el("td", {}, pct(hb.kv_cache_usage)),
      el("td", {}, n.spot_instance ? "spot" : "on-demand"),
      el("td", {}, n.region),
      actions(live && el("button", {onclick: () => act("Drain asked",
        () => api("POST", `/nodes/${n.id}/drain`, {reason: "console"}).then(schedule))},
        "Drain"), live && el("button", {class: "danger", onclick: () => {
          if (confirm(`Terminate node ${n.cluster_name || n.id}?`)) {
            act("Termination asked", () => api("POST", `/nodes/${n.id}/terminate`,
              {reason: "console"}).then(schedule));
          }
        }}, "Terminate")));
  };
  const redraw = () => draw().catch((err) => toast(`Fleet: ${err.message}`, true));
  const schedule = () => { if (!pending) pending = setTimeout(redraw, 250); };
  await draw();
  const stop = follow(`type=${encodeURIComponent("node.*")}&since=1m`, schedule);
  // Heartbeats are not events of the log: their figures are read again now and then.
  const timer = setInterval(schedule, 15000);
  return () => { stop(); clearInterval(timer); clearTimeout(pending); };
}

// ------------------------------------------------------------------ events

function eventsPage(main) {
  const list = el("ol", {class: "events", "data-testid": "events"});
  const fields = {
    type: el("input", {name: "type", placeholder: "type pattern, e.g. node.* or usage.*"}),
    tenant: el("input", {name: "tenant", placeholder: "tenant id"}),
    node: el("input", {name: "node", placeholder: "node id"}),
    since: el("input", {name: "since", placeholder: "since (1h, 2d, or a time)",
      value: "1h"}),
  };
  let stop = () => {};
  const start = (event) => {
    if (event) event.preventDefault();
    stop();
    list.replaceChildren();
    const params = new URLSearchParams();
    if (fields.type.value) params.set("type", fields.type.value);
    // One stream glob, as the CLI's --stream: a node's stream, or every stream a tenant's
    // id names (the tenant's own and its usage).
    const node = fields.node.value.trim(), tenant = fields.tenant.value.trim();
    if (node) params.set("stream", `node:${node}`);
    else if (tenant) params.set("stream", `*:${tenant}`);
    if (fields.since.value) params.set("since", fields.since.value);
    stop = follow(params.toString(), (record) => {
      const e = record.event || {};
      const row = el("li", {"data-type": e.type},
        el("details", {}, el("summary", {},
          el("time", {}, when(record.recorded_at)), " ", el("b", {}, e.type), " ",
          el("span", {class: "hint"}, e.tenant_id || e.node_id || e.subject || "")),
          el("pre", {}, JSON.stringify(record, null, 2))));
      list.prepend(row);
      while (list.children.length > 500) list.lastChild.remove();
    });
  };
  main.append(el("h1", {}, "Events"), el("form", {class: "filters", onsubmit: start},
    Object.values(fields), el("button", {type: "submit"}, "Tail")), list);
  start();
  return () => stop();
}

// ------------------------------------------------------------------ tenants

async function tenantsPage(main) {
  const detail = el("div");
  const list = el("div");
  const name = el("input", {name: "name", placeholder: "new tenant's name", required: true});
  const email = el("input", {name: "email", placeholder: "e-mail (optional)", type: "email"});
  const drawList = async () => {
    const tenants = await api("GET", "/tenants?limit=200");
    list.replaceChildren(table(["Tenant", "Status", "Created"], tenants.data.map((t) =>
      el("tr", {"data-tenant": t.id}, el("td", {}, el("a", {href: "#tenants",
        onclick: (ev) => { ev.preventDefault(); drawTenant(t.id); }}, t.name)),
      el("td", {class: `status ${t.status}`}, t.status), el("td", {}, when(t.created_at))))));
  };
  const drawTenant = async (id) => {
    const [t, envs, keys] = await Promise.all([api("GET", `/tenants/${id}`),
      api("GET", `/tenants/${id}/environments?limit=200`),
      api("GET", `/tenants/${id}/keys?limit=200`)]);
    const again = () => drawTenant(id).then(drawList);
    const envName = el("input", {placeholder: "new environment's name", required: true});
    detail.replaceChildren(el("section", {"data-testid": "tenant"},
      el("h2", {}, `${t.name} · `, el("span", {class: `status ${t.status}`}, t.status)),
      t.status === "active"
        ? el("button", {class: "danger", onclick: () => act("Suspended",
            () => api("POST", `/tenants/${id}/suspend`, {reason: "console"}).then(again))},
          "Suspend")
        : el("button", {onclick: () => act("Reactivated",
            () => api("POST", `/tenants/${id}/reactivate`, {reason: "console"})
              .then(again))}, "Reactivate"),
      ...envs.data.map((env) => environmentBlock(env,
        keys.data.filter((k) => k.environment_id === env.id), again)),
      el("form", {class: "inline", onsubmit: (ev) => { ev.preventDefault(); act(
        "Environment created", () => api("POST", `/tenants/${id}/environments`,
          {name: envName.value}).then(again)); }}, envName,
        el("button", {type: "submit"}, "Add environment"))));
  };
  main.append(el("h1", {}, "Tenants"), el("form", {class: "inline", onsubmit: (ev) => {
    ev.preventDefault();
    act("Tenant created", () => api("POST", "/tenants", {name: name.value,
      email: email.value}).then((t) => { name.value = email.value = ""; drawList();
      drawTenant(t.id); }));
  }}, name, email, el("button", {type: "submit"}, "Create tenant")), list, detail);
  await drawList();
  return () => {};
}

function environmentBlock(env, keys, again) {
  const quota = env.quota || {};
  const inputs = Object.fromEntries(["requests_per_minute", "tokens_per_minute",
    "tokens_per_day"].map((f) => [f, el("input", {type: "number", min: 0, name: f,
      value: quota[f] ?? "", placeholder: "none"})]));
  const keyName = el("input", {placeholder: "new key's name", required: true});
  const showKey = (created) => modal("The new key, shown once",
    el("p", {}, "Copy it now: it is not stored anywhere it can be read again."),
    el("code", {class: "secret", "data-testid": "new-key"}, created.key));
  return el("section", {class: "environment", "data-environment": env.id},
    el("h3", {}, `${env.name} · ${env.region} · ${env.status}`),
    el("form", {class: "inline quota", onsubmit: (ev) => {
      ev.preventDefault();
      const patch = {};
      for (const [field, input] of Object.entries(inputs)) {
        patch[field] = input.value === "" ? null : Number(input.value);
      }
      act("Quota saved", () => api("PATCH", `/environments/${env.id}`, {quota: patch})
        .then(again));
    }}, Object.entries(inputs).map(([f, input]) => el("label", {}, f.replaceAll("_", " "),
      input)), el("button", {type: "submit"}, "Save quota")),
    table(["Key", "Role", "Status", "Created", ""], keys.map((k) => el("tr",
      {"data-key": k.id, "data-status": k.status},
      el("td", {}, `${k.name} …${k.last_four}`), el("td", {}, k.role),
      el("td", {class: `status ${k.status}`}, k.status), el("td", {}, when(k.created_at)),
      actions(k.status === "active" && [
        el("button", {onclick: () => act("Rotated", () => api("POST",
          `/keys/${k.id}/rotate`, {reason: "console"}).then((created) => {
            showKey(created); again(); }))}, "Rotate"),
        el("button", {class: "danger", onclick: () => act("Revoked", () => api("POST",
          `/keys/${k.id}/revoke`, {reason: "console"}).then(again))}, "Revoke")])))),
    el("form", {class: "inline", onsubmit: (ev) => {
      ev.preventDefault();
      act("Key created", () => api("POST", `/environments/${env.id}/keys`,
        {name: keyName.value}).then((created) => { showKey(created); again(); }));
    }}, keyName, el("button", {type: "submit"}, "Create key")));
}

// ------------------------------------------------------------------ usage and billing

async function usagePage(main) {
  const granularity = el("select", {name: "granularity"}, el("option", {value: "hour"},
    "hourly, last 2 days"), el("option", {value: "day"}, "daily, last 30 days"));
  const charts = el("div", {class: "charts"});
  const exportsBox = el("div");
  const drawUsage = async () => {
    const hourly = granularity.value === "hour";
    const report = await api("GET", `/usage?granularity=${granularity.value}` +
      `&start=${hourly ? "2d" : "30d"}&group_by=tenant,model`);
    const tenants = new Map((await api("GET", "/tenants?limit=200")).data
      .map((t) => [t.id, t.name]));
    // Every period of the window, the empty ones as zero: the axis is the window's.
    const step = hourly ? 3600 : 86400;
    const last = Math.floor(Date.now() / 1000 / step) * step;
    const xs = [];
    for (let t = last - (hourly ? 47 : 29) * step; t <= last; t += step) xs.push(t);
    const series = new Map();
    for (const row of report.data) {
      const label = `${tenants.get(row.tenant_id) || row.tenant_id} · ${row.model}`;
      if (!series.has(label)) series.set(label, {tokens: new Map(), cost: new Map()});
      const at = Date.parse(row.period_start) / 1000;
      series.get(label).tokens.set(at, row.total_tokens);
      series.get(label).cost.set(at, Number(row.cost));
    }
    charts.replaceChildren(el("p", {}, `Total: ${report.total.total_tokens} tokens, ` +
      `${report.total.cost} ${report.currency.toUpperCase()}, ${report.total.requests} ` +
      "requests"));
    if (!series.size) { charts.append(el("p", {class: "hint"}, "No usage yet.")); return; }
    const labels = [...series.keys()];
    for (const [title, key] of [["Tokens", "tokens"], [`Cost (${report.currency})`, "cost"]]) {
      const box = el("figure", {"data-testid": `chart-${key}`}, el("figcaption", {}, title));
      charts.append(box);
      const data = [xs, ...labels.map((l) => xs.map((t) => series.get(l)[key].get(t) ?? 0))];
      const width = Math.max(260, Math.min(1100, box.clientWidth - 20));
      new uPlot({width, height: 220, scales: {x: {time: true}},
        axes: [{}, {size: 70, values: (u, vals) => vals.map(figure)}],
        series: [{}, ...labels.map((label, i) => ({label, width: 2,
          stroke: `hsl(${(i * 67) % 360} 60% 45%)`, fill: `hsl(${(i * 67) % 360} 60% 45% / .12)`,
          points: {show: true, size: 4}}))]}, data, box);
    }
  };
  const drawExports = async () => {
    const held = await api("GET", "/billing/exports?limit=100");
    exportsBox.replaceChildren(el("h2", {}, "Meter exports that need an eye"),
      table(["Tenant", "Hour", "Meter", "Value", "Status", "Error", ""], held.data.map((x) =>
        el("tr", {"data-export": x.identifier, "data-status": x.status},
          el("td", {title: x.tenant_id}, x.tenant_id.slice(0, 8)), el("td", {}, when(x.hour)),
          el("td", {}, x.meter), el("td", {}, x.value),
          el("td", {class: `status ${x.status}`}, x.status),
          el("td", {}, x.error || x.stripe_error || ""),
          actions(["resend", "mark_exported"].map((action) =>
            el("button", {onclick: () => act(`Settled (${action})`, () => api("POST",
              `/tenants/${x.tenant_id}/billing/exports/settle`,
              {identifier: x.identifier, action}).then(drawExports))},
            action === "resend" ? "Resend" : "Mark exported")))))));
  };
  granularity.addEventListener("change", drawUsage);
  main.append(el("h1", {}, "Usage and billing"), el("label", {}, "Period ", granularity),
    charts, exportsBox, el("h2", {}, "Stripe links"), await stripeLinks());
  await Promise.all([drawUsage(), drawExports()]);
  return () => {};
}

async function stripeLinks() {
  const tenants = (await api("GET", "/tenants?limit=50")).data;
  const rows = await Promise.all(tenants.map(async (t) => {
    const billing = await api("GET", `/tenants/${t.id}/billing`).catch(() => null);
    const account = billing && billing.account;
    return el("tr", {}, el("td", {}, t.name),
      el("td", {}, account && account.customer_id ? account.customer_id : "not linked"),
      el("td", {}, account ? account.payment_status : "—"),
      el("td", {}, account && account.subscription_status || "—"));
  }));
  return table(["Tenant", "Customer", "Payment", "Subscription"], rows);
}

// ------------------------------------------------------------------ notifications

async function notificationsPage(main) {
  const deliveries = el("div");
  const subs = await api("GET", "/subscriptions?limit=200");
  const show = async (sub) => {
    const found = await api("GET", `/subscriptions/${sub.id}/deliveries?limit=100`);
    deliveries.replaceChildren(el("h2", {}, `Deliveries to ${sub.target}`),
      table(["Event", "Status", "Attempts", "Last answer", "Next attempt", ""],
        found.data.map((d) => el("tr", {"data-status": d.status},
          el("td", {}, d.event_type), el("td", {class: `status ${d.status}`}, d.status),
          el("td", {}, d.attempts),
          el("td", {}, d.last_status_code ?? (d.last_error || "—")),
          el("td", {}, when(d.next_attempt_at)),
          actions(["failed", "cancelled"].includes(d.status) &&
            el("button", {onclick: () => act("Delivering again", () => api("POST",
              `/subscriptions/${sub.id}/deliveries/${d.id}/replay`).then(() => show(sub)))},
            "Replay"))))));
  };
  main.append(el("h1", {}, "Notifications"), table(["Kind", "Target", "Events", "Status",
    "Last success"], subs.data.map((s) => el("tr", {},
      el("td", {}, s.kind), el("td", {}, el("a", {href: "#notifications",
        onclick: (ev) => { ev.preventDefault(); show(s); }}, s.target)),
      el("td", {}, s.event_types.join(", ")), el("td", {class: `status ${s.status}`},
        s.status), el("td", {}, when(s.last_success_at))))), deliveries);
  return () => {};
}

// ------------------------------------------------------------------ shell

const PAGES = {fleet: fleetPage, events: eventsPage, tenants: tenantsPage, usage: usagePage,
  notifications: notificationsPage};

async function route() {
  leave();
  leave = () => {};
  const name = PAGES[location.hash.slice(1)] ? location.hash.slice(1) : "fleet";
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("here", link.dataset.page === name);
  }
  const main = document.getElementById("main");
  main.replaceChildren();
  main.dataset.page = name;
  try {
    leave = (await PAGES[name](main)) || (() => {});
  } catch (err) {
    main.append(el("p", {class: "error"}, `Could not load this page: ${err.message}`));
  }
  main.dataset.ready = name;
}

async function boot() {
  const session = await fetch("/console/session", {credentials: "same-origin"});
  if (!session.ok) { location.reload(); return; }
  csrf = (await session.json()).csrf_token;
  document.querySelector("#sign-out input[name=csrf]").value = csrf;
  window.addEventListener("hashchange", route);
  await route();
}

boot();
