/*
 * jupyter-replay-proxy's frontend plugin, served by the proxy itself as a federated extension of
 * the pages it rewrites (nothing is installed in JupyterLab).
 *
 * With server-side execution the proxy, not the browser, sends a cell's execute_request, so
 * stock JupyterLab has no request to attach an input() prompt to. The proxy sends the prompt to
 * each frontend of the kernel as if that frontend had asked (JupyterLab reports such messages
 * as "unhandled") with the cell's id in its metadata; this plugin shows JupyterLab's own stdin
 * widget in that cell and sends the answer back on the kernel's stdin channel. The proxy writes
 * the echo of the answer into the notebook, as it writes every output of the execution.
 *
 * It is a module federation container written by hand: JupyterLab calls init() with its share
 * scope (the application's own singleton packages) and get() for the plugin module.
 */
(function () {
  'use strict';

  const NAME = 'jupyter-replay-proxy';
  let sharedScope = null;

  /** The application's own instance of a shared package (JupyterLab's tokens are identities). */
  async function shared(name) {
    const versions = sharedScope && sharedScope[name];
    if (!versions) {
      throw new Error(`${NAME}: ${name} is not shared by this application`);
    }
    const loaded = Object.keys(versions).filter(version => versions[version].loaded);
    const version = (loaded.length ? loaded : Object.keys(versions))[0];
    const factory = await versions[version].get();
    return factory();
  }

  function plugin(notebook, outputarea, widgets) {
    /** Show the prompt at the end of the cell's outputs until it is answered or the cell ends. */
    function ask(panel, message) {
      const cellId = (message.metadata || {}).cellId;
      const cell = panel.content.widgets.find(widget => widget.model.id === cellId);
      const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
      if (!cell || !cell.outputArea || !kernel) {
        return;
      }
      const item = new widgets.Panel();
      item.addClass('jp-OutputArea-child');
      item.addClass('jp-OutputArea-stdin-item');
      const prompt = new outputarea.OutputPrompt();
      prompt.addClass('jp-OutputArea-prompt');
      item.addWidget(prompt);
      const input = new outputarea.Stdin({
        parent_header: message.header,
        prompt: message.content.prompt,
        password: message.content.password,
        future: {
          sendInputReply: (content, parentHeader) => kernel.sendInputReply(content, parentHeader)
        }
      });
      input.addClass('jp-OutputArea-output');
      item.addWidget(input);
      cell.outputArea.layout.addWidget(item);
      const done = () => {
        if (!item.isDisposed) {
          item.dispose();
        }
      };
      void input.value.then(done);
      // Answered elsewhere (another tab, the API) or ended: the cell's run ends, the prompt goes.
      const parentId = message.parent_header.msg_id;
      const ended = (_, reply) => {
        if (
          reply.parent_header.msg_id === parentId &&
          reply.header.msg_type === 'status' &&
          reply.content.execution_state === 'idle'
        ) {
          panel.sessionContext.iopubMessage.disconnect(ended);
          done();
        }
      };
      panel.sessionContext.iopubMessage.connect(ended);
    }

    function follow(panel) {
      panel.sessionContext.unhandledMessage.connect((_, message) => {
        if (message.channel === 'stdin' && message.header.msg_type === 'input_request') {
          ask(panel, message);
        }
      });
    }

    return {
      id: `${NAME}:server-side-input`,
      description: 'Shows input() prompts of server-side executions in their cells.',
      autoStart: true,
      requires: [notebook.INotebookTracker],
      activate: (app, tracker) => {
        tracker.forEach(follow);
        tracker.widgetAdded.connect((_, panel) => follow(panel));
      }
    };
  }

  window._JUPYTERLAB = window._JUPYTERLAB || {};
  window._JUPYTERLAB[NAME] = {
    init: scope => {
      sharedScope = scope;
    },
    get: async () => {
      const [notebook, outputarea, widgets] = await Promise.all([
        shared('@jupyterlab/notebook'),
        shared('@jupyterlab/outputarea'),
        shared('@lumino/widgets')
      ]);
      const module = { __esModule: true, default: [plugin(notebook, outputarea, widgets)] };
      return () => module;
    }
  };
})();
