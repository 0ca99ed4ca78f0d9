// The console's only script: copy buttons, and the playground's images shown as they arrive (read from
// the streamed answer; without this script the form is answered once they are all made).
document.querySelectorAll("[data-copy]").forEach((button) => {
  button.addEventListener("click", async () => {
    const text = document.getElementById(button.dataset.copy).textContent;
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  });
});

const playground = document.getElementById("playground");
if (playground && window.fetch && window.TextDecoder) {
  playground.addEventListener("submit", (event) => {
    event.preventDefault();
    generate(playground);
  });
}

async function generate(form) {
  const live = document.getElementById("live");
  const images = live.querySelector(".images");
  const summary = live.querySelector("[data-summary]");
  const failure = document.getElementById("live-error");
  const button = form.querySelector("button[type=submit]");
  const working = document.getElementById("working");
  document.querySelectorAll(".server-result").forEach((old) => old.remove());
  images.replaceChildren();
  summary.textContent = "";
  failure.hidden = true;
  live.hidden = false;
  working.hidden = false;
  button.disabled = true;
  const format = form.elements.output_format.value;
  let preview = null;
  const show = (name, data) => {
    if (name === "error") throw new Error(data.error.message);
    if (name === "qubax.summary") {
      summary.textContent = `Made by ${data.route} in ${data.seconds} s, costing ${data.cost}.`;
      return;
    }
    const image = name.endsWith(".partial_image") ? (preview ||= document.createElement("img")) : document.createElement("img");
    image.src = `data:image/${format};base64,${data.b64_json}`;
    image.alt = name.endsWith(".partial_image") ? "A partial image" : `Image ${images.querySelectorAll("img:not(.partial)").length + 1} for the prompt`;
    image.classList.toggle("partial", name.endsWith(".partial_image"));
    if (name.endsWith(".completed") && preview) {
      preview.remove();
      preview = null;
    }
    images.append(image);
  };
  try {
    const response = await fetch(`${form.action}/stream`, {
      method: "POST",
      body: new FormData(form),
      headers: { "x-csrf-token": form.elements.csrf_token.value },
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error(body?.error?.message || `The server answered ${response.status}.`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replaceAll("\r\n", "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const name = (block.match(/^event: ?(.*)$/m) || [])[1];
        const data = block.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trimStart()).join("\n");
        if (name && data) show(name, JSON.parse(data));
      }
    }
  } catch (error) {
    failure.textContent = error.message;
    failure.hidden = false;
  } finally {
    working.hidden = true;
    button.disabled = false;
  }
}
