// The OpenAPI schema as a readable list of endpoints, parameters, bodies and responses (textContent only).
"use strict";

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function schemaText(schema, spec) {
  if (!schema) return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.oneOf) return schema.oneOf.map((s) => schemaText(s, spec)).join("  |  ");
  if (schema.type === "object" && schema.properties) {
    const required = new Set(schema.required || []);
    return "{" + Object.entries(schema.properties).map(([name, s]) =>
      name + (required.has(name) ? "" : "?") + ": " + schemaText(s, spec)).join(", ") + "}";
  }
  if (schema.type === "array") return schemaText(schema.items, spec) + "[]";
  return schema.format === "binary" ? "file" : (schema.type || "any");
}

function operation(path, method, op, spec) {
  const section = el("section", undefined, "card");
  section.style.padding = ".6rem .9rem";
  section.style.marginBottom = ".8rem";
  section.append(el("h2", method.toUpperCase() + " " + path));
  if (op.summary) section.append(el("p", op.summary, "muted"));
  const list = el("ul");
  (op.parameters || []).forEach((p) => list.append(el("li", p.in + " " + p.name + ": " + schemaText(p.schema, spec) +
    (p.description ? " — " + p.description : ""))));
  const body = op.requestBody && op.requestBody.content;
  if (body) Object.entries(body).forEach(([type, c]) => list.append(el("li", "body (" + type + "): " +
    schemaText(c.schema, spec))));
  Object.entries(op.responses || {}).forEach(([status, r]) => {
    const content = r.content && Object.entries(r.content)[0];
    list.append(el("li", status + " " + (r.description || "") + (content ? " → " + content[0] + " " +
      schemaText(content[1].schema, spec) : "")));
  });
  section.append(list);
  return section;
}

async function render() {
  const main = document.getElementById("endpoints");
  const spec = await (await fetch("/openapi.json")).json();
  const sections = [];
  Object.entries(spec.paths).forEach(([path, ops]) =>
    Object.entries(ops).forEach(([method, op]) => sections.push(operation(path, method, op, spec))));
  Object.entries((spec.components || {}).schemas || {}).forEach(([name, schema]) => {
    const section = el("section", undefined, "card");
    section.style.padding = ".4rem .9rem";
    section.style.marginBottom = ".5rem";
    section.append(el("h3", name), el("code", schemaText(schema, spec)));
    sections.push(section);
  });
  main.replaceChildren(...sections);
}

document.addEventListener("DOMContentLoaded", render);
