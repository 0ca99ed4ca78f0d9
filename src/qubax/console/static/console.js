// The console's only script: copy buttons, and a "Generating…" note while the playground works.
document.querySelectorAll("[data-copy]").forEach((button) => {
  button.addEventListener("click", async () => {
    const text = document.getElementById(button.dataset.copy).textContent;
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  });
});
const playground = document.getElementById("playground");
if (playground) {
  playground.addEventListener("submit", () => {
    document.getElementById("working").hidden = false;
    playground.querySelector("button[type=submit]").disabled = true;
  });
}
