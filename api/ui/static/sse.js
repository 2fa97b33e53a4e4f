// A Server-Sent Events parser (the WHATWG event stream format) for text pushed in arbitrary pieces.
export class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.reset();
  }

  reset() {
    this.fields = { id: "", event: "", data: [] };
  }

  push(text) {
    this.buffer += text;
    // Lines end with \r\n, \n or \r; a \r at the very end may be the first half of a \r\n.
    const lines = this.buffer.split(/\r\n|\n|\r(?!$)/);
    this.buffer = lines.pop();
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") {
      if (this.fields.data.length || this.fields.event) {
        this.onEvent({ id: this.fields.id, event: this.fields.event, data: this.fields.data.join("\n") });
      }
      this.reset();
      return;
    }
    if (line.startsWith(":")) return; // a comment: the server's keep-alive ping
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") this.fields.data.push(value);
    else if (name === "event") this.fields.event = value;
    else if (name === "id") this.fields.id = value;
  }
}
