// The login form keeps the page's #id=... so the same terminal opens after logging in.
'use strict';
document.addEventListener('DOMContentLoaded', () => {
  const form = document.getElementById('login');
  if (form && location.hash) form.action = form.getAttribute('action') + location.hash;
});
