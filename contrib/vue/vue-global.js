// "vue" for a page that loads Vue's global build (vue.global.prod.js) with a
// plain <script> and no bundler: map the bare specifier to this file,
//
//   <script src="/vendor/vue.global.prod.js"></script>
//   <script type="importmap">{ "imports": { "vue": "/vendor/vue-global.js" } }</script>
//
// and modules written for a bundler, such as useNotifyd.js, import from
// "vue" unchanged.
const Vue = globalThis.Vue;
if (!Vue) throw new Error("vue-global.js: load Vue's global build (vue.global.prod.js) first");

export const {
  computed,
  createApp,
  defineComponent,
  effectScope,
  getCurrentScope,
  h,
  nextTick,
  onMounted,
  onScopeDispose,
  onUnmounted,
  reactive,
  readonly,
  ref,
  shallowRef,
  toRefs,
  watch,
  watchEffect,
} = Vue;
export default Vue;
