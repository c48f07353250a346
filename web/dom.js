// DOM helpers shared by every view of the page.

/** The first element matching a CSS selector, or null. */
export const $ = (selector) => document.querySelector(selector);

/** Build an element: el('td', {className: 'num'}, 'text', child, ...). */
export function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}
