// The chat page's logic: keeps the conversation, streams each answer from /v1/chat/completions
// (server-sent events read with fetch, so a Stop button can abort the request and free the
// server's slot), shows the reasoning folded, the token rate, and which devices computed.
"use strict";

const $ = (id) => document.getElementById(id);
const messages = [];
let controller = null;

$("key").value = localStorage.getItem("moemesh-key") || "";
$("key").addEventListener("change", () => {
  localStorage.setItem("moemesh-key", $("key").value);
  showDevices();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

async function getJSON(path) {
  const r = await fetch(path, { headers: headers() });
  if (!r.ok) throw new Error((await r.json()).error?.message || r.statusText);
  return r.json();
}

async function showDevices() {
  try {
    const { devices } = await getJSON("/api/devices");
    $("devices").replaceChildren(...devices.map((d) => {
      const li = document.createElement("li");
      li.className = d.up ? "up" : "down";
      li.textContent = `${d.name}${d.address ? " " + d.address : ""}: ${d.role}`;
      return li;
    }));
    const models = await getJSON("/v1/models");
    $("model").textContent = models.data[0]?.id || "";
    $("status").textContent = "";
  } catch (e) {
    $("status").textContent = e.message;
  }
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  $("log").appendChild(div);
  return div;
}

function answerView() {
  const div = bubble("assistant");
  const details = document.createElement("details");
  details.className = "reasoning";
  details.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "thinking…";
  const thoughts = document.createElement("div");
  details.append(summary, thoughts);
  const content = document.createElement("div");
  content.className = "content";
  const meta = document.createElement("div");
  meta.className = "meta";
  div.append(details, content, meta);
  return { div, details, summary, thoughts, content, meta };
}

async function send(text) {
  messages.push({ role: "user", content: text });
  bubble("user").textContent = text;
  const view = answerView();
  controller = new AbortController();
  $("send").hidden = true;
  $("stop").hidden = false;
  const started = performance.now();
  let reasoning = "", content = "", tokens = 0, timings = null, failure = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ messages, stream: true, reasoning_effort: $("effort").value,
                             temperature: Number($("temperature").value) }),
    });
    if (!r.ok) throw new Error((await r.json()).error?.message || r.statusText);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffered.indexOf("\n\n")) >= 0) {
        const event = buffered.slice(0, cut);
        buffered = buffered.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const data = JSON.parse(event.slice(6));
        if (data.error) throw new Error(data.error.message);
        if (data.timings) timings = data.timings;
        const delta = data.choices?.[0]?.delta || {};
        if (delta.reasoning_content) {
          reasoning += delta.reasoning_content;
          view.details.hidden = false;
          view.thoughts.textContent = reasoning;
          tokens++;
        }
        if (delta.content) {
          content += delta.content;
          view.content.textContent = content;
          view.summary.textContent = "reasoning";
          tokens++;
        }
        if (delta.tool_calls) tokens++;
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") failure = e.message;
  } finally {
    controller = null;
    $("send").hidden = false;
    $("stop").hidden = true;
  }
  view.summary.textContent = "reasoning";
  messages.push({ role: "assistant", content });
  const seconds = (performance.now() - started) / 1000;
  const rate = timings ? timings.predicted_per_second : tokens / seconds;
  view.meta.textContent = failure ? "error: " + failure
    : `${timings ? timings.predicted_n : tokens} tokens, ${rate.toFixed(1)} tok/s`;
  showDevices();
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller?.abort());
$("clear").addEventListener("click", () => {
  messages.length = 0;
  $("log").replaceChildren();
});
showDevices();
