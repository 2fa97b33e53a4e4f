// The console's shell: asks for a key when the API needs one, and routes #/page/... to a page module.
// Each page's render(root, ...params) draws into root and returns a function that stops its timers
// and streams, called before the next page is drawn.
import { api, auth, config } from "./api.js";
import * as batches from "./pages/batches.js";
import * as job from "./pages/job.js";
import * as jobs from "./pages/jobs.js";
import * as overview from "./pages/overview.js";
import * as playground from "./pages/playground.js";

const PAGES = { overview, jobs, job, batches, playground };
const view = document.getElementById("view");
const dialog = document.getElementById("key-dialog");
let stop = () => {};

function route() {
  stop();
  const [name, ...params] = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const page = PAGES[name] ? name : "overview";
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.page === (page === "job" ? "jobs" : page));
  }
  view.replaceChildren();
  view.dataset.page = page;
  stop = PAGES[page].render(view, ...params) || (() => {});
}

function showAuth() {
  const state = document.getElementById("auth-state");
  const button = document.getElementById("key-button");
  button.hidden = !auth.required;
  state.textContent = auth.required ? (auth.key ? "key set" : "no key") : "auth off";
}

function askForKey(message) {
  const error = document.getElementById("key-error");
  error.hidden = !message;
  error.textContent = message || "";
  if (!dialog.open) dialog.showModal();
  document.getElementById("key-input").focus();
}

async function checkKey(key) {
  auth.key = key;
  try {
    await api("/v1/stats");
    return null;
  } catch (err) {
    auth.key = null;
    return err.message;
  }
}

async function start() {
  const cfg = await config();
  auth.required = cfg.auth_required;
  auth.onUnauthorized = (err) => {
    auth.key = null;
    showAuth();
    askForKey(err.message);
  };
  document.getElementById("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("key-input");
    const problem = await checkKey(input.value.trim());
    if (problem) {
      askForKey(problem);
      return;
    }
    input.value = "";
    dialog.close();
    showAuth();
    route();
  });
  document.getElementById("key-button").addEventListener("click", () => askForKey());
  showAuth();
  window.addEventListener("hashchange", route);
  if (auth.required && !auth.key) {
    askForKey();
    return;
  }
  route();
}

start();
