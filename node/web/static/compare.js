// The compare panel: the chosen picture over the original, its opacity on a slider.
document.querySelectorAll(".compare").forEach((panel) => {
  const top = panel.querySelector("img.top");
  const slider = panel.querySelector("input[type=range]");
  slider.addEventListener("input", () => { top.style.opacity = slider.value / 100; });
  panel.querySelectorAll("input[type=radio]").forEach((radio) => {
    radio.addEventListener("change", () => { top.src = `${panel.dataset.base}/${radio.value}.png`; });
  });
});
